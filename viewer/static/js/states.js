// The page's states other than "showing images": one place that draws them, so the
// viewer and the share-link pages (which add expired, revoked, wrong code, locked,
// used and wrong recipient from the link exchange's refusal reasons, an unknown
// link and an address without one) look alike.

import { t } from "./i18n.js";

export const STATES = [
  "loading",
  "arriving",
  "unavailable",
  "notfound",
  "unauthorized",
  "forbidden",
  "failed",
  "expired",
  "revoked",
  "wrong-code",
  "locked",
  "used",
  "recipient",
  "invalid",
  "no-link",
  "no-study",
];

// Show state `name` in `root`; params fill the message ({remaining} for wrong-code),
// onRetry adds a retry button; detail is a server message safe to show.
export function showState(root, name, { params = {}, onRetry = null, detail = "" } = {}) {
  if (!STATES.includes(name)) throw new Error(`unknown state ${name}`);
  root.replaceChildren();
  root.hidden = false;
  root.dataset.state = name;
  root.setAttribute("aria-busy", String(name === "loading" || name === "arriving"));
  const heading = document.createElement("h2");
  heading.textContent = t(`state.${name}.title`, params);
  const message = document.createElement("p");
  message.textContent = t(`state.${name}.message`, params);
  root.append(heading, message);
  if (name === "loading" || name === "arriving") {
    const spinner = document.createElement("div");
    spinner.className = "spinner";
    spinner.setAttribute("aria-hidden", "true");
    root.prepend(spinner);
  }
  if (detail) {
    const small = document.createElement("p");
    small.className = "detail";
    small.textContent = detail;
    root.append(small);
  }
  if (onRetry) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = t("state.retry");
    button.addEventListener("click", onRetry);
    root.append(button);
    button.focus();
  }
  return root;
}

export function hideState(root) {
  root.hidden = true;
  root.replaceChildren();
  delete root.dataset.state;
}

// The state for an ApiError's kind.
export function stateForError(error) {
  switch (error?.kind) {
    case "unavailable":
      return "unavailable";
    case "unauthorized":
      // What became of the access token: its share link was revoked or has expired.
      if (error.reason === "token-revoked") return "revoked";
      if (error.reason === "token-expired") return "expired";
      return "unauthorized";
    case "forbidden":
      return "forbidden";
    case "notfound":
      return "notfound";
    default:
      return "failed";
  }
}
