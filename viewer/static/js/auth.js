// The access token the viewer sends as "Authorization: Bearer ...".
//
// The share-link page exchanges the link's token (read from the URL fragment, never
// sent in a URL) for a short-lived access token scoped to the link's studies, and
// hands it over with setAccess(). It lives in sessionStorage: it survives a reload
// of this tab, is gone when the tab closes, and is never part of any URL.
// `details` says where it came from ({source: "link"} for a share link), so the
// share-link page presents only a sign-in token, never a previous link's, as who
// is opening a link bound to an institution.

const KEY = "studybridge.access";

export function setAccess(token, expiresAt = null, details = {}) {
  sessionStorage.setItem(KEY, JSON.stringify({ ...details, token, expiresAt }));
}

export function clearAccess() {
  sessionStorage.removeItem(KEY);
}

// The stored access ({token, expiresAt, ...details}) while it lasts, else null.
export function access() {
  let stored;
  try {
    stored = JSON.parse(sessionStorage.getItem(KEY) || "null");
  } catch {
    return null;
  }
  if (!stored || typeof stored.token !== "string") return null;
  if (stored.expiresAt && Date.parse(stored.expiresAt) <= Date.now()) return null;
  return stored;
}

export function accessToken() {
  return access()?.token ?? null;
}

export function authHeaders(extra = {}) {
  const token = accessToken();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}
