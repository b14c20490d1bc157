// What the viewer offers beyond looking: download the study (a zip with a DICOMDIR,
// the layout a CD importer or PACS reads) and "send to our PACS" (forwarding to a
// DICOM peer of the signed-in institution: a forwarding job, POST /api/jobs). The
// server decides which (/api/studies/{uid}/actions, from consent.access); the
// buttons only mirror it, and the download and job routes decide again.
//
// A download is a native browser download (streamed to disk, not held in memory):
// a POST form carrying the access token as the form field access_token (RFC 6750
// 2.2), since a browser download cannot carry an Authorization header and the token
// must never be put in a URL.

import { accessToken, authHeaders } from "./auth.js";
import { t } from "./i18n.js";

const API = "/api/studies";

export async function studyActions(study) {
  try {
    const response = await fetch(`${API}/${study}/actions`, {
      headers: authHeaders({ Accept: "application/json" }),
      credentials: "omit",
      referrerPolicy: "no-referrer",
      cache: "no-store",
    });
    if (!response.ok) return null;
    return await response.json();
  } catch {
    return null; // no buttons; viewing goes on
  }
}

export function download(study) {
  const form = document.createElement("form");
  form.method = "POST";
  form.action = `${API}/${study}/media`;
  form.hidden = true;
  const field = document.createElement("input");
  field.type = "hidden";
  field.name = "access_token";
  field.value = accessToken() || "";
  form.append(field);
  document.body.append(form);
  form.submit();
  form.remove();
}

export async function forward(study, peer) {
  let response;
  try {
    response = await fetch("/api/jobs", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "application/json" }),
      body: JSON.stringify({ study_uid: study, peer }),
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  } catch (error) {
    return { ok: false, text: t("actions.forward.failed", { reason: String(error.message || error) }) };
  }
  let answer = {};
  try {
    answer = await response.json();
  } catch {
    /* the status says enough */
  }
  if (!response.ok) {
    const reason = answer.message || `HTTP ${response.status}`;
    return { ok: false, text: t("actions.forward.failed", { reason }) };
  }
  const n = answer.instances?.pending ?? "";
  return { ok: true, text: t("actions.forward.sent", { peer, n }) };
}

// Fill `group` (a toolbar group) with the buttons `actions` allows; `say` shows a
// status line.
export function renderActions(group, study, actions, say) {
  group.replaceChildren();
  if (!actions?.download) {
    group.hidden = true;
    return;
  }
  const button = document.createElement("button");
  button.type = "button";
  button.id = "download";
  button.textContent = t("actions.download");
  button.title = t("actions.download.hint");
  button.addEventListener("click", () => download(study));
  group.append(button);
  for (const peer of actions.forward || []) {
    const send = document.createElement("button");
    send.type = "button";
    send.className = "forward";
    send.dataset.peer = peer.ae_title;
    send.textContent = actions.forward.length === 1 ? t("actions.forward") : t("actions.forward.to", { peer: peer.description });
    send.title = t("actions.forward.to", { peer: peer.description });
    send.addEventListener("click", async () => {
      send.disabled = true;
      const result = await forward(study, peer.ae_title);
      send.disabled = false;
      say(result.text, result.ok);
    });
    group.append(send);
  }
  group.hidden = false;
}
