// Language catalogues (static/i18n/<lang>.json) and applying them to the page.
// The language is the user's choice (kept in localStorage), else the browser's
// first preferred language we speak, else English.

const STORAGE_KEY = "studybridge.lang";
let catalogue = {};
let fallback = {};
let current = "en";

export function chooseLanguage(available) {
  const stored = safeGet(STORAGE_KEY);
  if (stored && available.includes(stored)) return stored;
  for (const tag of navigator.languages || [navigator.language || "en"]) {
    const base = String(tag).toLowerCase().split("-")[0];
    if (available.includes(base)) return base;
  }
  return "en";
}

async function load(lang) {
  const response = await fetch(new URL(`../i18n/${lang}.json`, import.meta.url));
  if (!response.ok) throw new Error(`language ${lang}: HTTP ${response.status}`);
  return response.json();
}

export async function setLanguage(lang, { remember = false } = {}) {
  if (!Object.keys(fallback).length) fallback = await load("en");
  catalogue = lang === "en" ? fallback : await load(lang);
  current = lang;
  document.documentElement.lang = lang;
  if (remember) safeSet(STORAGE_KEY, lang);
  translate(document);
}

export function language() {
  return current;
}

// t("overlay.image", {n: 3, total: 40}) -> "Image 3 / 40"
export function t(key, params = {}) {
  let text = catalogue[key] ?? fallback[key] ?? key;
  for (const [name, value] of Object.entries(params)) {
    text = text.replaceAll(`{${name}}`, String(value));
  }
  return text;
}

// Elements say what to translate: data-i18n (text), data-i18n-title, data-i18n-label
// (aria-label).
export function translate(root) {
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of root.querySelectorAll("[data-i18n-label]")) {
    el.setAttribute("aria-label", t(el.dataset.i18nLabel));
  }
}

// A count: key + ".one"/".other" (Intl plural rules of the language), else key.
export function tn(key, n, params = {}) {
  const form = new Intl.PluralRules(current).select(n);
  const specific = `${key}.${form}`;
  const known = specific in catalogue || specific in fallback;
  return t(known ? specific : `${key}.other`, { n, ...params });
}

export function formatNumber(value, digits = 1) {
  return new Intl.NumberFormat(current, {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  }).format(value);
}

function safeGet(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function safeSet(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    /* private mode: the choice lasts for this page only */
  }
}
