// The portal pages' side of a browser session (see dicomweb/sessions.py).
//
// The session itself is an HttpOnly cookie this script never sees. What it keeps is
// the CSRF token (sessionStorage: gone with the tab), sent as X-CSRF-Token on every
// request that changes something. Opening a study asks for a short-lived access
// token of the same account and hands it to the viewer as any DICOMweb viewer gets
// one: sessionStorage, then the study in the URL fragment, never the token in a URL.

import { setAccess } from "./auth.js";

const CSRF_KEY = "studybridge.csrf";
const API = new URL("../../../api/", import.meta.url).pathname; // /api/ beside /viewer/

export class PortalError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function csrf() {
  return sessionStorage.getItem(CSRF_KEY) || "";
}

export async function api(path, { method = "GET", body = undefined } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      referrerPolicy: "no-referrer",
      cache: "no-store",
    });
  } catch (error) {
    throw new PortalError(0, "unavailable", String(error.message || error));
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    /* not JSON (a proxy's error page) */
  }
  if (!response.ok) {
    const code = answer?.error || (response.status >= 500 ? "unavailable" : "failed");
    throw new PortalError(response.status, code, answer?.message || `HTTP ${response.status}`);
  }
  return answer;
}

export async function signIn(username, password, code) {
  const answer = await api("session/browser", {
    method: "POST",
    body: { username, password, code: code || null },
  });
  sessionStorage.setItem(CSRF_KEY, answer.csrf);
  return answer.account;
}

// The signed-in account, or null (a reload of the page keeps the session).
export async function whoAmI() {
  try {
    const answer = await api("session/browser");
    sessionStorage.setItem(CSRF_KEY, answer.csrf);
    return answer.account;
  } catch (error) {
    if (error.status === 401) return null;
    throw error;
  }
}

// Sign out; returns where the browser should go next: the identity provider's sign-out
// page when the session came from an OpenID Connect sign-in and the provider has one
// (so it forgets this browser too), otherwise null.
export async function signOut() {
  try {
    const answer = await api("session/browser", { method: "DELETE" });
    return (answer && answer.end_session_url) || null;
  } finally {
    sessionStorage.removeItem(CSRF_KEY);
  }
}

// Where an account goes after signing in.
export function homeOf(account) {
  if (account.kind === "patient") return "portal";
  if (account.kind === "staff") return "inbox";
  return null;
}

// A short-lived access token of the signed-in account ({access_token, expires_at}),
// stored where the viewer reads it. Not a link's token: the share-link page may
// present it as who opens a link bound to an institution. Needs whoAmI() or
// signIn() first in this tab (the CSRF token).
export async function viewerToken() {
  const answer = await api("session/viewer-token", { method: "POST" });
  setAccess(answer.access_token, answer.expires_at, { source: "session" });
  return answer;
}

export async function openInViewer(studyUid) {
  await viewerToken();
  location.assign(`./#study=${encodeURIComponent(studyUid)}`);
}
