// The patient portal: my studies (by hospital; closed clinics marked; open in the
// viewer), share links (create with a QR code, list, revoke), consents (give,
// revoke), hospitals' requests (approve, decline) and the access history.
//
// Everything comes from /api with the session cookie (see session.js). A new link's
// token is in the fragment of the link shown once; it is kept nowhere here.

import { t, tn } from "./i18n.js";
import { dicomDate, el, errorText, say, showAccount, startPage, tOr, when } from "./page.js";
import { api, openInViewer, whoAmI } from "./session.js";

const state = {
  groups: [],
  studies: new Map(), // uid -> study
  institutions: [],
  links: [],
  consents: [],
  requests: [],
  history: { accesses: [], break_glass: [] },
  created: null, // the link just made: {url, qr, code}
};
let revoking = null;

function studyName(uid) {
  const study = state.studies.get(uid);
  if (!study) return t("portal.study.unknown");
  const what = study.description || study.modalities.join(", ") || t("portal.study.untitled");
  return `${dicomDate(study.date)} · ${what}`;
}

function fail(error, where = "page-message") {
  if (error.status === 401) {
    location.assign("signin");
    return;
  }
  say(where, errorText(error), "error");
}

// -- studies ---------------------------------------------------------------------------
function drawStudies() {
  const root = document.getElementById("study-groups");
  root.replaceChildren();
  if (!state.groups.length) {
    root.append(el("p", { class: "empty", text: t("portal.studies.none") }));
    return;
  }
  for (const group of state.groups) {
    const heading = el(
      "h3",
      {},
      group.institution || t("portal.studies.unknownSender"),
      group.closed ? el("span", { class: "badge closed", text: t("portal.closed") }) : null,
    );
    const list = el("ul", { class: "studies" });
    for (const study of group.studies) {
      const modalities = study.modalities.length ? study.modalities.join(", ") : "—";
      list.append(
        el(
          "li",
          { class: "study", dataset: { uid: study.study_uid } },
          el(
            "div",
            { class: "study-text" },
            el("strong", { text: study.description || t("portal.study.untitled") }),
            el(
              "span",
              { class: "muted" },
              `${dicomDate(study.date)} · ${modalities} · ${tn("portal.study.images", study.instances)}`,
            ),
          ),
          el("button", {
            type: "button",
            class: "open",
            text: t("portal.open"),
            "aria-label": t("portal.openNamed", { name: studyName(study.study_uid) }),
            onclick: () => openInViewer(study.study_uid).catch((e) => fail(e)),
          }),
        ),
      );
    }
    const note = group.closed ? el("p", { class: "muted small", text: t("portal.closed.note") }) : null;
    const data = { institution: group.institution, closed: String(group.closed) };
    root.append(el("div", { class: "group", dataset: data }, heading, note, list));
  }
}

function studyChecks(rootId, name) {
  const root = document.getElementById(rootId);
  const checked = new Set([...root.querySelectorAll("input:checked")].map((i) => i.value));
  root.replaceChildren();
  for (const uid of state.studies.keys()) {
    const id = `${name}-${uid}`;
    root.append(
      el(
        "p",
        { class: "field check" },
        el("input", { type: "checkbox", id, name, value: uid, checked: checked.has(uid) }),
        el("label", { for: id, text: studyName(uid) }),
      ),
    );
  }
}

function institutionOptions(select, { anyone = false } = {}) {
  const value = select.value;
  select.replaceChildren();
  if (anyone) select.append(el("option", { value: "", text: t("portal.share.anyone") }));
  for (const inst of state.institutions) {
    const label = inst.closed ? `${inst.name} (${t("portal.closed")})` : inst.name;
    select.append(el("option", { value: inst.name, text: label }));
  }
  if ([...select.options].some((o) => o.value === value)) select.value = value;
}

// -- share links -----------------------------------------------------------------------
function linkStatus(link) {
  if (link.revoked_at) return "revoked";
  if (link.used_at) return "used";
  if (Date.parse(link.expires_at) <= Date.now()) return "expired";
  return "active";
}

function drawLinks() {
  const root = document.getElementById("link-list");
  root.replaceChildren();
  if (!state.links.length) {
    root.append(el("li", { class: "empty", text: t("portal.links.none") }));
    return;
  }
  for (const link of state.links) {
    const status = linkStatus(link);
    const facts = [
      status === "active" ? t("portal.links.until", { date: when(link.expires_at) }) : null,
      status === "revoked" ? t("portal.links.revokedAt", { date: when(link.revoked_at) }) : null,
      link.has_access_code ? t("portal.links.code") : t("portal.links.noCode"),
      link.can_download ? t("portal.links.download") : t("portal.links.viewOnly"),
      link.recipient_institution ? t("portal.links.for", { name: link.recipient_institution }) : null,
    ].filter(Boolean);
    root.append(
      el(
        "li",
        { class: "row", dataset: { link: link.id, status } },
        el(
          "div",
          { class: "row-text" },
          el(
            "strong",
            {},
            link.label || link.study_uids.map(studyName).join("; "),
            el("span", { class: `badge ${status}`, text: t(`portal.links.status.${status}`) }),
          ),
          el("span", { class: "muted", text: facts.join(" · ") }),
          link.label ? el("span", { class: "muted small", text: link.study_uids.map(studyName).join("; ") }) : null,
        ),
        status === "active"
          ? el("button", {
              type: "button",
              class: "danger",
              text: t("portal.links.revoke"),
              "aria-label": t("portal.links.revokeNamed", { name: link.label || studyName(link.study_uids[0]) }),
              onclick: (event) => askRevoke(link, event.currentTarget),
            })
          : null,
      ),
    );
  }
}

function askRevoke(link, opener) {
  revoking = { link, opener };
  const dialog = document.getElementById("revoke-dialog");
  dialog.returnValue = ""; // Escape keeps the last value: never let it mean "revoke"
  dialog.showModal();
  document.getElementById("revoke-cancel").focus();
}

document.getElementById("revoke-dialog").addEventListener("close", async () => {
  const dialog = document.getElementById("revoke-dialog");
  const chosen = revoking;
  revoking = null;
  if (!chosen) return;
  if (dialog.returnValue !== "revoke") {
    chosen.opener.focus();
    return;
  }
  try {
    const answer = await api(`me/links/${chosen.link.id}`, { method: "DELETE" });
    await loadLinks();
    say("page-message", answer.notice ? t("portal.links.revoked") : "", "info");
    document.getElementById("links-heading").focus?.();
  } catch (error) {
    fail(error);
  }
});

function drawCreated() {
  const box = document.getElementById("share-result");
  const created = state.created;
  box.hidden = !created;
  if (!created) return;
  document.getElementById("share-url").value = created.url;
  const qr = document.getElementById("share-qr");
  qr.src = created.qr;
  qr.alt = t("portal.share.qr");
  const reminder = document.getElementById("share-code-reminder");
  reminder.hidden = !created.code;
  reminder.textContent = created.code ? t("portal.share.codeReminder", { code: created.code }) : "";
}

document.getElementById("share-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const uids = [...document.querySelectorAll("#share-studies input:checked")].map((i) => i.value);
  if (!uids.length) {
    say("share-error", t("portal.share.chooseStudy"), "error");
    document.querySelector("#share-studies input")?.focus();
    return;
  }
  say("share-error", "");
  const code = document.getElementById("share-code").value.trim();
  const body = {
    study_uids: uids,
    days: Number(document.getElementById("share-days").value),
    access_code: code || null,
    can_download: document.getElementById("share-download").checked,
    recipient_institution: document.getElementById("share-recipient").value || null,
    label: document.getElementById("share-label").value.trim(),
  };
  try {
    const answer = await api("me/links", { method: "POST", body });
    if (state.created?.qr) URL.revokeObjectURL(state.created.qr);
    const qr = URL.createObjectURL(new Blob([answer.qr_svg], { type: "image/svg+xml" }));
    state.created = { url: answer.url, qr, code };
    drawCreated();
    document.getElementById("share-form").reset();
    document.getElementById("share-result").focus();
    await loadLinks();
  } catch (error) {
    fail(error, "share-error");
  }
});

document.getElementById("share-copy").addEventListener("click", async () => {
  const input = document.getElementById("share-url");
  try {
    await navigator.clipboard.writeText(input.value);
    say("share-copied", t("portal.share.copied"));
  } catch {
    input.select(); // no clipboard permission: leave it selected for Ctrl+C
    say("share-copied", t("portal.share.copyByHand"));
  }
});

// -- consents and requests ---------------------------------------------------------------
function consentView(fhir) {
  const p = fhir.provision || {};
  return {
    id: fhir.id,
    status: fhir.status,
    decision: p.type,
    institution: p.actor?.[0]?.reference?.display || "",
    purpose: p.purpose?.[0]?.code || "",
    start: p.period?.start,
    end: p.period?.end,
    studies: (p.data || []).map((d) => String(d.reference.identifier.value).replace(/^urn:oid:/, "")),
  };
}

function drawConsents() {
  const root = document.getElementById("consent-list");
  root.replaceChildren();
  if (!state.consents.length) {
    root.append(el("li", { class: "empty", text: t("portal.consents.none") }));
    return;
  }
  for (const c of state.consents.map(consentView)) {
    const scope = c.studies.length ? c.studies.map(studyName).join("; ") : t("portal.consents.allShort");
    const period = c.end
      ? t("portal.consents.period", { start: when(c.start), end: when(c.end) })
      : t("portal.consents.from", { start: when(c.start) });
    root.append(
      el(
        "li",
        { class: "row", dataset: { consent: c.id, status: c.status } },
        el(
          "div",
          { class: "row-text" },
          el(
            "strong",
            {},
            c.institution,
            el("span", { class: `badge ${c.status}`, text: t(`portal.consents.status.${c.status}`) }),
          ),
          el("span", { class: "muted", text: `${tOr(`purpose.${c.purpose}`, c.purpose)} · ${period}` }),
          el("span", { class: "muted small", text: scope }),
        ),
        c.status === "active"
          ? el("button", {
              type: "button",
              class: "danger",
              text: t("portal.consents.revoke"),
              "aria-label": t("portal.consents.revokeNamed", { name: c.institution }),
              onclick: async () => {
                try {
                  await api(`me/consents/${c.id}`, { method: "DELETE" });
                  await loadConsents();
                  say("page-message", t("portal.consents.revoked", { name: c.institution }));
                } catch (error) {
                  fail(error);
                }
              },
            })
          : null,
      ),
    );
  }
}

document.getElementById("consent-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const some = document.getElementById("consent-some").checked;
  const uids = [...document.querySelectorAll("#consent-studies input:checked")].map((i) => i.value);
  if (some && !uids.length) {
    say("consent-error", t("portal.share.chooseStudy"), "error");
    return;
  }
  const end = document.getElementById("consent-end").value;
  const body = {
    institution: document.getElementById("consent-institution").value,
    purpose: document.getElementById("consent-purpose").value,
    study_uids: some ? uids : null,
    end: end ? new Date(`${end}T23:59:59`).toISOString() : null,
  };
  try {
    await api("me/consents", { method: "POST", body });
    say("consent-error", "");
    document.getElementById("consent-form").reset();
    await loadConsents();
    say("page-message", t("portal.consents.given", { name: body.institution }));
  } catch (error) {
    fail(error, "consent-error");
  }
});

document.getElementById("consent-studies").addEventListener("change", () => {
  document.getElementById("consent-some").checked = true;
});

function drawRequests() {
  const root = document.getElementById("request-list");
  root.replaceChildren();
  if (!state.requests.length) {
    root.append(el("li", { class: "empty", text: t("portal.requests.none") }));
    return;
  }
  for (const r of state.requests) {
    const scope = r.study_uids.length ? r.study_uids.map(studyName).join("; ") : t("portal.consents.allShort");
    const decide = (decision) => async () => {
      try {
        await api(`me/requests/${r.id}/${decision}`, { method: "POST" });
        await Promise.all([loadRequests(), loadConsents()]);
        say("page-message", t(`portal.requests.${decision}d`, { name: r.institution }));
      } catch (error) {
        fail(error);
      }
    };
    root.append(
      el(
        "li",
        { class: "row", dataset: { request: r.id } },
        el(
          "div",
          { class: "row-text" },
          el("strong", { text: r.institution }),
          el("span", { class: "muted", text: `${tOr(`purpose.${r.purpose}`, r.purpose)} · ${when(r.created_at)}` }),
          r.reason ? el("span", { text: t("portal.requests.reason", { reason: r.reason }) }) : null,
          el("span", { class: "muted small", text: scope }),
        ),
        el(
          "span",
          { class: "buttons" },
          el("button", { type: "button", class: "primary", text: t("portal.requests.approve"), "aria-label": t("portal.requests.approveNamed", { name: r.institution }), onclick: decide("approve") }),
          el("button", { type: "button", text: t("portal.requests.decline"), "aria-label": t("portal.requests.declineNamed", { name: r.institution }), onclick: decide("decline") }),
        ),
      ),
    );
  }
}

// -- history ----------------------------------------------------------------------------
function drawHistory() {
  const body = document.getElementById("history-rows");
  body.replaceChildren();
  const { accesses, break_glass: grants } = state.history;
  if (!accesses.length) {
    body.append(el("tr", {}, el("td", { colspan: "5", class: "empty", text: t("portal.history.none") })));
  }
  for (const a of accesses) {
    const who = a.institution ? `${a.who} (${a.institution})` : a.who;
    const times = a.count > 1 ? ` ${t("portal.history.times", { n: a.count, last: when(a.last_at) })}` : "";
    body.append(
      el(
        "tr",
        { class: a.break_glass ? "break-glass" : "", dataset: { outcome: a.outcome } },
        el("td", {}, when(a.at), times),
        el("td", {}, who, el("span", { class: "muted small block", text: tOr(`portal.kind.${a.kind}`, a.kind) })),
        el(
          "td",
          {},
          tOr(`portal.operation.${a.operation}`, a.operation),
          a.break_glass ? el("span", { class: "badge break-glass", text: t("portal.breakGlass") }) : null,
        ),
        el("td", { text: a.study_uid ? studyName(a.study_uid) : "" }),
        el("td", { text: tOr(`portal.outcome.${a.outcome}`, a.outcome) }),
      ),
    );
  }
  const list = document.getElementById("grant-list");
  list.replaceChildren();
  for (const g of grants) {
    list.append(
      el(
        "li",
        { class: "row break-glass" },
        el(
          "div",
          { class: "row-text" },
          el("strong", {}, el("span", { class: "badge break-glass", text: t("portal.breakGlass") })),
          el("span", { text: t("portal.history.grant", { start: when(g.started_at), end: when(g.ended_at || g.expires_at) }) }),
          el("span", { class: "muted", text: g.reason }),
        ),
      ),
    );
  }
}

// -- loading ---------------------------------------------------------------------------
async function loadStudies() {
  const answer = await api("me/studies");
  state.groups = answer.institutions;
  state.studies = new Map(answer.institutions.flatMap((g) => g.studies).map((s) => [s.study_uid, s]));
}

async function loadLinks() {
  state.links = await api("me/links");
  drawLinks();
}

async function loadConsents() {
  state.consents = await api("me/consents");
  drawConsents();
}

async function loadRequests() {
  state.requests = await api("me/requests");
  drawRequests();
}

async function loadHistory() {
  state.history = await api("me/history");
  drawHistory();
}

function drawAll() {
  drawStudies();
  studyChecks("share-studies", "share-study");
  studyChecks("consent-studies", "consent-study");
  institutionOptions(document.getElementById("share-recipient"), { anyone: true });
  institutionOptions(document.getElementById("consent-institution"));
  drawLinks();
  drawConsents();
  drawRequests();
  drawHistory();
  drawCreated();
  document.title = `studybridge · ${t("portal.studies.title")}`;
}

await startPage(drawAll);
const account = await whoAmI().catch(() => null);
if (!account) {
  location.assign("signin");
} else if (account.kind !== "patient") {
  location.assign(account.kind === "staff" ? "inbox" : "signin");
} else {
  showAccount(account);
  try {
    const [, institutions, links, consents, requests, history] = await Promise.all([
      loadStudies(),
      api("institutions"),
      api("me/links"),
      api("me/consents"),
      api("me/requests"),
      api("me/history"),
    ]);
    Object.assign(state, { institutions, links, consents, requests, history });
    drawAll();
    document.body.dataset.ready = "true";
  } catch (error) {
    fail(error);
  }
}
