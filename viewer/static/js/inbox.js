// An institution's inbox: the studies patients shared with it by consent or by a share
// link bound to it (until the link expires; no token or code needed), and those a
// user reaches through their own declared break-glass access (flagged), each opened
// in the viewer with the user's own short-lived access token.

import { t, tn } from "./i18n.js";
import { dicomDate, el, errorText, say, showAccount, startPage } from "./page.js";
import { api, openInViewer, whoAmI } from "./session.js";

let studies = [];

// DICOM PN "FAMILY^GIVEN=ideographic=phonetic" as "FAMILY GIVEN (ideographic)".
function personName(value) {
  const groups = String(value || "").split("=").map((g) => g.split("^").filter(Boolean).join(" "));
  const [first, ...rest] = groups.filter(Boolean);
  if (!first) return t("portal.unknown");
  return rest.length ? `${first} (${rest.join(", ")})` : first;
}

function draw() {
  const body = document.getElementById("inbox-rows");
  body.replaceChildren();
  if (!studies.length) {
    body.append(el("tr", {}, el("td", { colspan: "5", class: "empty", text: t("inbox.none") })));
  }
  for (const s of studies) {
    const what = s.description || t("portal.study.untitled");
    const modalities = s.modalities.length ? s.modalities.join(", ") : "—";
    body.append(
      el(
        "tr",
        { dataset: { uid: s.study_uid, reason: s.reason } },
        el("td", {}, personName(s.patient_name), el("span", { class: "muted small block", text: s.patient_id })),
        el(
          "td",
          {},
          el("strong", { text: what }),
          el("span", { class: "muted small block", text: `${dicomDate(s.date)} · ${modalities} · ${tn("portal.study.images", s.instances)}` }),
        ),
        el(
          "td",
          {},
          s.institution || t("portal.studies.unknownSender"),
          s.closed ? el("span", { class: "badge closed", text: t("portal.closed") }) : null,
        ),
        el(
          "td",
          {},
          s.reason === "break-glass"
            ? el("span", { class: "badge break-glass", text: t("portal.breakGlass") })
            : s.reason === "share-link"
              ? t("inbox.reason.shareLink", { until: new Date(s.shared_until).toLocaleString() })
              : t("inbox.reason.consent"),
        ),
        el(
          "td",
          {},
          el("button", {
            type: "button",
            class: "open",
            text: t("portal.open"),
            "aria-label": t("portal.openNamed", { name: `${personName(s.patient_name)} · ${what}` }),
            onclick: () => openInViewer(s.study_uid).catch((e) => say("page-message", errorText(e), "error")),
          }),
        ),
      ),
    );
  }
  document.title = `studybridge · ${t("inbox.title")}`;
}

await startPage(draw);
const account = await whoAmI().catch(() => null);
if (!account) {
  location.assign("signin");
} else if (account.kind !== "staff") {
  location.assign(account.kind === "patient" ? "portal" : "signin");
} else {
  showAccount(account);
  try {
    studies = (await api("inbox")).studies;
    draw();
    document.body.dataset.ready = "true";
  } catch (error) {
    if (error.status === 401) location.assign("signin");
    else say("page-message", errorText(error), "error");
  }
}
