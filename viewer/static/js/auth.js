// The access token the viewer sends as "Authorization: Bearer ...".
//
// The share-link page exchanges the link's token (read from the URL fragment, never
// sent in a URL) for a short-lived access token scoped to the link's studies, and
// hands it over with setAccess(). It lives in sessionStorage: it survives a reload
// of this tab, is gone when the tab closes, and is never part of any URL.

const KEY = "studybridge.access";

export function setAccess(token, expiresAt = null) {
  sessionStorage.setItem(KEY, JSON.stringify({ token, expiresAt }));
}

export function clearAccess() {
  sessionStorage.removeItem(KEY);
}

export function accessToken() {
  let stored;
  try {
    stored = JSON.parse(sessionStorage.getItem(KEY) || "null");
  } catch {
    return null;
  }
  if (!stored || typeof stored.token !== "string") return null;
  if (stored.expiresAt && Date.parse(stored.expiresAt) <= Date.now()) return null;
  return stored.token;
}

export function authHeaders(extra = {}) {
  const token = accessToken();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}
