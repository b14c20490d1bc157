// The share-link page (/viewer/share#sbl_...): trades the link for a short-lived
// access token and opens the viewer.
//
// The link's token is in the URL fragment, which browsers send to no server and put
// in no Referer. The page takes it out of the address bar (and so out of the
// history) at once, keeps it in memory only, and POSTs it: /api/links/describe
// first (read-only: showing this page consumes nothing, so link scanners that fetch
// it do no harm), then /api/links/exchange with the access code when the link has
// one. A single-use link is exchanged only when the person clicks "Open", so even a
// scanner that runs scripts does not use it up. The access token goes to
// sessionStorage (auth.js) and the viewer opens with the study in its fragment.

import { access, setAccess } from "./auth.js";
import { chooseLanguage, language, setLanguage, t, translate } from "./i18n.js";
import { hideState, showState } from "./states.js";

const TOKEN = /^sbl_[A-Za-z0-9_-]{16,196}$/;
const $ = (id) => document.getElementById(id);
const page = { token: null, info: null, state: null, wrong: null, busy: false };

// Refusals of the exchange (the answer's "error") and the page's state for each.
const REFUSED = {
  expired: "expired",
  revoked: "revoked",
  used: "used",
  locked: "locked",
  recipient: "recipient",
  unknown: "invalid",
};

class Unavailable extends Error {}

async function post(path, body, headers = {}) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json", ...headers },
      body: JSON.stringify(body),
      credentials: "omit",
      referrerPolicy: "no-referrer",
      cache: "no-store",
    });
  } catch (error) {
    throw new Unavailable(String(error?.message || error));
  }
  if (response.status >= 500) throw new Unavailable(`HTTP ${response.status}`);
  let answer = {};
  try {
    answer = await response.json();
  } catch {
    /* an empty or non-JSON answer: the status says enough */
  }
  return { status: response.status, answer };
}

function readToken() {
  const raw = decodeURIComponent(location.hash.replace(/^#/, ""));
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  return TOKEN.test(raw) ? raw : null;
}

// -- states ----------------------------------------------------------------------------
function setState(name, options = {}) {
  page.state = { name, options };
  $("card").hidden = true;
  showState($("state"), name, options);
  document.body.dataset.state = name;
}

function showCard() {
  page.state = null;
  hideState($("state"));
  $("card").hidden = false;
  document.body.dataset.state = "link";
}

function unavailable(retry) {
  setState("unavailable", { onRetry: retry });
}

// -- the link --------------------------------------------------------------------------
function formatWhen(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return iso;
  return new Intl.DateTimeFormat(language(), { dateStyle: "long", timeStyle: "short" }).format(when);
}

function renderFacts() {
  const info = page.info;
  const facts = $("facts");
  facts.replaceChildren();
  const rows = [
    ["share.facts.expires", formatWhen(info.expires_at)],
    ["share.facts.use", t(info.can_download ? "share.facts.download" : "share.facts.view-only")],
  ];
  if (info.single_use) rows.push(["share.facts.once", t("share.facts.once.value")]);
  if (info.recipient_institution) rows.push(["share.facts.recipient", info.recipient_institution]);
  for (const [key, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = t(key);
    const dd = document.createElement("dd");
    dd.textContent = value;
    facts.append(dt, dd);
  }
}

function showWrongCode(remaining) {
  page.wrong = remaining;
  const error = $("code-error");
  error.hidden = false;
  error.textContent = `${t("state.wrong-code.title")}. ${t("state.wrong-code.message", { remaining })}`;
  const input = $("code");
  input.setAttribute("aria-invalid", "true");
  input.select();
  input.focus();
}

async function describe() {
  let reply;
  try {
    reply = await post("/api/links/describe", { token: page.token });
  } catch {
    return unavailable(describe);
  }
  if (reply.status === 404) return setState("invalid");
  if (reply.status !== 200) return setState("failed", { detail: reply.answer.message || "" });
  page.info = reply.answer;
  if (page.info.status !== "usable") return setState(REFUSED[page.info.status] || "failed");
  showCard();
  renderFacts();
  if (page.info.needs_access_code) {
    $("code-form").hidden = false;
    $("code").focus();
  } else if (page.info.single_use) {
    $("confirm").hidden = false;
    $("open").focus();
  } else {
    await exchange(null);
  }
}

// The sign-in token of someone signed in on this tab (institution staff opening a
// link bound to their institution); never a token a previous share link gave.
function presenter() {
  const stored = access();
  return stored && stored.source !== "link" ? { Authorization: `Bearer ${stored.token}` } : {};
}

// A link bound to an institution needs its staff: staff signed in to the portal in
// this browser (a session cookie) get a token of their account for the exchange.
async function signedInStaff() {
  if (Object.keys(presenter()).length) return;
  try {
    const session = await import("./session.js");
    const account = await session.whoAmI();
    if (account?.kind === "staff") await session.viewerToken();
  } catch {
    /* not signed in (or no portal here): the exchange says who the link is for */
  }
}

async function exchange(code) {
  if (page.busy) return;
  page.busy = true;
  for (const button of document.querySelectorAll("#card button")) button.disabled = true;
  try {
    await tryExchange(code);
  } finally {
    page.busy = false;
    for (const button of document.querySelectorAll("#card button")) button.disabled = false;
  }
}

async function tryExchange(code) {
  if (page.info?.recipient_institution) await signedInStaff();
  const body = { token: page.token, access_code: code };
  let reply;
  try {
    reply = await post("/api/links/exchange", body, presenter());
    if (reply.status === 401 && reply.answer.error !== "access-code" && Object.keys(presenter()).length) {
      // The sign-in on this tab has ended: open the link as an anonymous holder.
      reply = await post("/api/links/exchange", body);
    }
  } catch {
    return unavailable(() => exchange(code));
  }
  const { status, answer } = reply;
  if (status === 200) return openViewer(answer);
  if (answer.error === "access-code") {
    if (answer.remaining === 0) return setState("locked");
    return showWrongCode(answer.remaining);
  }
  const state = REFUSED[answer.error];
  if (state) return setState(state);
  return setState("failed", { detail: answer.message || "" });
}

function openViewer(answer) {
  setAccess(answer.access_token, answer.expires_at, { source: "link" });
  const studies = answer.study_uids || [];
  const target = studies.length === 1 ? `./#study=${studies[0]}` : "./";
  // replace(): Back from the viewer does not return to a spent link page.
  location.replace(target);
}

// -- start -----------------------------------------------------------------------------
async function main() {
  const available = ["en", "ko"];
  const lang = chooseLanguage(available);
  await setLanguage(lang);
  const select = $("lang");
  select.value = lang;
  select.addEventListener("change", async () => {
    await setLanguage(select.value, { remember: true });
    translate(document);
    if (page.state) showState($("state"), page.state.name, page.state.options);
    if (page.info && !$("card").hidden) renderFacts();
    if (page.wrong !== null) showWrongCode(page.wrong);
  });
  $("code-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const code = $("code").value.trim();
    if (!code) {
      $("code").focus();
      return;
    }
    exchange(code);
  });
  $("open").addEventListener("click", () => exchange(null));
  // A link pasted into a tab already showing this page changes only the fragment.
  window.addEventListener("hashchange", () => {
    if (location.hash) start();
  });
  await start();
}

async function start() {
  page.token = readToken();
  page.info = null;
  page.wrong = null;
  for (const id of ["code-form", "confirm", "code-error"]) $(id).hidden = true;
  $("code").value = "";
  $("code").removeAttribute("aria-invalid");
  if (!page.token) return setState("no-link");
  await describe();
}

main().catch((error) => {
  console.error(error);
  setState("failed");
});
