// What every portal page shares: the language (switch and browser default), the
// signed-in bar (who, sign out), formatting of dates, and small DOM helpers.

import { chooseLanguage, language, setLanguage, t } from "./i18n.js";
import { signOut } from "./session.js";

let languages = ["en", "ko"];

// Load the language, wire the switch; onChange re-draws what scripts wrote.
export async function startPage(onChange = () => {}) {
  try {
    const response = await fetch("config.json", { cache: "no-cache" });
    if (response.ok) languages = (await response.json()).languages || languages;
  } catch {
    /* the defaults will do */
  }
  const select = document.getElementById("lang");
  await setLanguage(chooseLanguage(languages));
  select.value = language();
  select.addEventListener("change", async () => {
    await setLanguage(select.value, { remember: true });
    onChange();
  });
}

export function showAccount(account) {
  const who = document.getElementById("who");
  who.textContent = account.institution
    ? t("portal.who.staff", { name: account.display_name, institution: account.institution })
    : account.display_name;
  const out = document.getElementById("sign-out");
  out.hidden = false;
  out.addEventListener("click", async () => {
    let next = "signin";
    try {
      next = (await signOut()) || next;
    } finally {
      location.assign(next);
    }
  });
}

// Build an element: el("li", {class: "x", dataset: {id: 1}}, child, "text", ...).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// DICOM DA (YYYYMMDD, the sender's local date) as a date in the page's language.
export function dicomDate(value) {
  const m = /^(\d{4})(\d{2})(\d{2})$/.exec(value || "");
  if (!m) return value || t("portal.unknown");
  const date = new Date(Date.UTC(+m[1], +m[2] - 1, +m[3]));
  return new Intl.DateTimeFormat(language(), { dateStyle: "medium", timeZone: "UTC" }).format(date);
}

// An ISO timestamp of ours (UTC) in the reader's time zone.
export function when(iso) {
  if (!iso) return "";
  return new Intl.DateTimeFormat(language(), { dateStyle: "medium", timeStyle: "short" }).format(
    new Date(iso),
  );
}

// A message in a live region (role=status or role=alert element).
export function say(id, text, kind = "info") {
  const node = document.getElementById(id);
  node.textContent = text;
  node.dataset.kind = kind;
  node.hidden = !text;
}

// An error of the portal API as a sentence (its code's translation, else its message).
export function errorText(error) {
  const key = `portal.error.${error.code}`;
  const known = t(key);
  return known !== key ? known : error.message || t("portal.error.failed");
}

// A translated label for a code from the server, or the code itself if it is new.
export function tOr(key, code) {
  const text = t(key);
  return text === key ? code : text;
}
