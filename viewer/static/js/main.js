// The study viewer page: wires the DICOMweb client, the viewport, the series list,
// the overlays and the language switch together.
//
// The study to show is in the URL fragment (#study=<Study Instance UID>): the
// fragment never reaches a server. Without one, the page lists the studies the
// access token may see.

import { renderActions, studyActions } from "./actions.js";
import { ApiError, DicomWeb } from "./api.js";
import {
  TAG,
  documentKind,
  first,
  formatDate,
  formatTime,
  lossiness,
  number,
  numbers,
  orientationMarkers,
  slicesOf,
  spacing,
  text,
  values,
} from "./dicom.js";
import { FrameCache } from "./frames.js";
import { chooseLanguage, formatNumber, setLanguage, t, tn, translate } from "./i18n.js";
import { renderReport } from "./sr.js";
import { hideState, showState, stateForError } from "./states.js";
import { Viewport } from "./viewport.js";

// CT presets (Hounsfield units): center, width.
export const PRESETS = {
  brain: { center: 40, width: 80 },
  lung: { center: -600, width: 1500 },
  bone: { center: 400, width: 1800 },
  abdomen: { center: 50, width: 400 },
};
const PRESET_KEYS = ["brain", "lung", "bone", "abdomen"];
const PREFETCH = 12; // slices on each side
const ARRIVING_RETRY_MS = 5000;
const REFRESH_MS = 20000;

const $ = (id) => document.getElementById(id);
const ui = {};
const app = {
  api: null,
  study: null,
  studyDs: null,
  series: [],
  current: null,
  index: 0,
  stateName: null,
  stateOptions: null,
  measurement: "",
  refreshTimer: null,
};
// Settles when the first image is on screen (or the study has none to show).
app.firstImage = new Promise((resolve) => {
  app.firstImageShown = resolve;
});

// -- start -----------------------------------------------------------------------------
async function main() {
  for (const id of [
    "state", "viewer", "toolbar", "series-list", "viewport", "canvas", "ov-tl", "ov-tr",
    "ov-bl", "ov-br", "or-top", "or-bottom", "or-left", "or-right", "lossy", "busy",
    "document", "attr-list", "notice", "study-title", "lang", "preset", "side",
    "study-actions", "action-status",
  ]) {
    ui[id] = $(id);
  }
  // Configuration and language catalogue load together (the languages are known).
  const defaults = { dicomweb: "/dicom-web", languages: ["en", "ko"] };
  const lang = chooseLanguage(defaults.languages);
  const [config] = await Promise.all([
    fetch("config.json", { credentials: "omit" })
      .then((response) => (response.ok ? response.json() : defaults))
      .catch(() => defaults),
    setLanguage(lang),
  ]);
  ui.lang.value = lang;
  ui.lang.addEventListener("change", async () => {
    await setLanguage(ui.lang.value, { remember: true });
    refreshTexts();
  });
  app.api = new DicomWeb(config.dicomweb);
  app.frames = new FrameCache((r) => app.api.frame(r.study, r.series, r.sop, r.frame, r.windowing));
  app.viewport = new Viewport(ui.canvas, {
    onScroll: (delta) => showSlice(app.index + delta),
    onWindow: (windowing, final) => setWindow(windowing, { final, preset: "custom" }),
    onDraw: () => updateZoom(),
    onMeasure: (label) => {
      app.measurement = label;
      updateOverlays();
    },
  });
  app.viewport.formatLength = (mm) => `${formatNumber(mm, 1)} mm`;
  bindToolbar();
  bindKeys();
  // The skip link focuses the image without touching the fragment (which names the study).
  document.querySelector(".skip").addEventListener("click", (e) => {
    e.preventDefault();
    ui.viewport.focus();
  });
  window.addEventListener("hashchange", route);
  await route();
}

function studyFromHash() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const study = params.get("study");
  return study && /^[0-9.]{1,64}$/.test(study) ? study : null;
}

async function route() {
  const study = studyFromHash();
  clearTimeout(app.refreshTimer);
  if (!study) return listStudies();
  return openStudy(study);
}

// -- states ----------------------------------------------------------------------------
function setState(name, options = {}) {
  app.stateName = name;
  app.stateOptions = options;
  ui.viewer.hidden = true;
  ui.toolbar.hidden = true;
  ui.notice.hidden = true;
  showState(ui.state, name, options);
  document.body.dataset.state = name;
}

function clearState() {
  app.stateName = null;
  hideState(ui.state);
  ui.viewer.hidden = false;
  ui.toolbar.hidden = false;
  document.body.dataset.state = "viewing";
}

function fail(error, retry) {
  if (error?.name === "AbortError") return;
  if (!(error instanceof ApiError)) console.error(error);
  // A server's message is shown as detail; a browser's network error text is not
  // (it is in the browser's language, not the page's).
  const detail = error instanceof ApiError && error.status ? error.message : "";
  const state = stateForError(error);
  // A revoked or expired link does not come back: no retry, the state says it all.
  if (state === "revoked" || state === "expired") return setState(state);
  setState(state, { onRetry: retry, detail });
}

// -- study list (no study in the fragment) ---------------------------------------------
async function listStudies() {
  setState("loading");
  let studies;
  try {
    studies = await app.api.studies({ limit: 100 });
  } catch (error) {
    return fail(error, listStudies);
  }
  setState("no-study");
  if (!studies.length) return;
  const list = document.createElement("ul");
  list.className = "study-list";
  for (const ds of studies) {
    const uid = text(ds, TAG.StudyInstanceUID);
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = `#study=${uid}`;
    link.textContent = [
      text(ds, TAG.PatientName),
      formatDate(text(ds, TAG.StudyDate)),
      values(ds, TAG.ModalitiesInStudy).join("/"),
      text(ds, TAG.StudyDescription),
    ]
      .filter(Boolean)
      .join(" · ");
    item.append(link);
    list.append(item);
  }
  ui.state.append(list);
}

// -- a study ---------------------------------------------------------------------------
async function openStudy(study) {
  app.study = study;
  app.series = [];
  app.current = null;
  app.frames.clear();
  app.viewport.clear();
  setState("loading");
  let found;
  let seriesList;
  try {
    // Both at once: an unknown study answers an empty list or 404 for its series.
    [found, seriesList] = await Promise.all([
      app.api.studies({ StudyInstanceUID: study }),
      app.api.series(study).catch((error) => {
        if (error instanceof ApiError && error.kind === "notfound") return [];
        throw error;
      }),
    ]);
  } catch (error) {
    return fail(error, () => openStudy(study));
  }
  if (!found.length || !seriesList.length) {
    // Not (yet) here: a transfer may still be on its way. Ask again shortly.
    setState("arriving");
    app.refreshTimer = setTimeout(() => {
      if (studyFromHash() === study) openStudy(study);
    }, ARRIVING_RETRY_MS);
    return;
  }
  app.studyDs = found[0];
  app.series = seriesList
    .map((ds) => ({
      ds,
      uid: text(ds, TAG.SeriesInstanceUID),
      count: number(ds, TAG.NumberOfSeriesRelatedInstances) ?? 0,
      instances: null,
      slices: [],
      kind: null,
    }))
    .sort((a, b) => (number(a.ds, TAG.SeriesNumber) ?? 0) - (number(b.ds, TAG.SeriesNumber) ?? 0));
  clearState();
  renderStudyTitle();
  renderSeriesList();
  // Download / send buttons once the first image is up (they never delay it).
  app.firstImage.then(() => showActions(study));
  const firstImage = app.series.find((s) => !["SR", "DOC", "KO", "PR"].includes(text(s.ds, TAG.Modality)));
  await selectSeries(firstImage || app.series[0]);
  app.refreshTimer = setTimeout(refreshSeries, REFRESH_MS);
}

async function showActions(study) {
  const actions = await studyActions(study);
  if (study !== app.study) return;
  app.actions = actions;
  renderActions(ui["study-actions"], study, actions, say);
}

function say(text, ok = true) {
  const status = ui["action-status"];
  status.textContent = text;
  status.dataset.ok = String(ok);
  status.hidden = false;
}

// New images of a study still arriving: counts and series are re-read now and then.
async function refreshSeries() {
  const study = app.study;
  let seriesList;
  try {
    seriesList = await app.api.series(study);
  } catch {
    seriesList = null;
  }
  if (study !== app.study) return;
  if (seriesList) {
    let changed = false;
    for (const ds of seriesList) {
      const uid = text(ds, TAG.SeriesInstanceUID);
      const count = number(ds, TAG.NumberOfSeriesRelatedInstances) ?? 0;
      const known = app.series.find((s) => s.uid === uid);
      if (!known) {
        app.series.push({ ds, uid, count, instances: null, slices: [], kind: null });
        changed = true;
      } else if (known.count !== count) {
        known.ds = ds;
        known.count = count;
        known.instances = null;
        changed = true;
      }
    }
    if (changed) {
      renderSeriesList();
      if (app.current && app.current.instances === null) await selectSeries(app.current, { keepIndex: true });
    }
  }
  app.refreshTimer = setTimeout(refreshSeries, REFRESH_MS);
}

function renderStudyTitle() {
  const ds = app.studyDs;
  ui["study-title"].textContent = [
    text(ds, TAG.PatientName),
    text(ds, TAG.StudyDescription),
    formatDate(text(ds, TAG.StudyDate)),
  ]
    .filter(Boolean)
    .join(" · ");
}

function seriesCaption(entry) {
  const number = text(entry.ds, TAG.SeriesNumber);
  const modality = text(entry.ds, TAG.Modality);
  const description = text(entry.ds, TAG.SeriesDescription);
  return {
    title: [modality, number && `#${number}`].filter(Boolean).join(" "),
    detail: [description, tn("series.count", entry.count)].filter(Boolean).join(" · "),
  };
}

function renderSeriesList() {
  ui["series-list"].replaceChildren();
  for (const entry of app.series) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "series-item";
    button.dataset.series = entry.uid;
    button.setAttribute("aria-current", String(entry === app.current));
    const thumb = document.createElement("span");
    thumb.className = "thumb";
    const modality = text(entry.ds, TAG.Modality);
    const caption = seriesCaption(entry);
    if (["SR", "DOC", "KO", "PR"].includes(modality)) {
      thumb.textContent = modality === "DOC" ? "PDF" : modality;
      thumb.classList.add("doc");
    } else if (entry.thumbnail) {
      thumb.append(thumbnailImage(entry));
    } else {
      thumb.classList.add("pending");
      // Thumbnails wait for the first image: on a busy server it comes first.
      app.firstImage.then(() => loadThumbnail(entry, thumb));
    }
    const label = document.createElement("span");
    label.className = "caption";
    const strong = document.createElement("strong");
    strong.textContent = caption.title;
    const small = document.createElement("small");
    small.textContent = caption.detail;
    label.append(strong, small);
    button.append(thumb, label);
    button.addEventListener("click", () => selectSeries(entry));
    entry.button = button;
    item.append(button);
    ui["series-list"].append(item);
  }
}

function thumbnailImage(entry) {
  const img = document.createElement("img");
  img.alt = "";
  img.src = entry.thumbnail;
  return img;
}

async function loadThumbnail(entry, holder) {
  try {
    const blob = await app.api.thumbnail(app.study, entry.uid);
    entry.thumbnail = URL.createObjectURL(blob);
    holder.classList.remove("pending");
    holder.replaceChildren(thumbnailImage(entry));
  } catch {
    holder.classList.remove("pending");
    holder.classList.add("missing");
    holder.textContent = text(entry.ds, TAG.Modality) || "?";
  }
}

async function selectSeries(entry, { keepIndex = false } = {}) {
  const previous = app.current;
  app.current = entry;
  for (const s of app.series) s.button?.setAttribute("aria-current", String(s === entry));
  if (!entry.instances) {
    ui.busy.hidden = false;
    try {
      entry.instances = await app.api.seriesMetadata(app.study, entry.uid);
    } catch (error) {
      ui.busy.hidden = true;
      return fail(error, () => selectSeries(entry));
    }
    ui.busy.hidden = true;
    entry.slices = slicesOf(entry.instances);
    entry.kind = entry.slices.length ? "image" : documentKind(entry.instances[0] || {}) || "other";
    if (!entry.windowing) entry.windowing = storedWindow(entry.slices[0]?.ds);
    entry.presetName = "default";
  }
  if (app.current !== entry) return;
  document.body.dataset.kind = entry.kind;
  if (entry.kind !== "image") {
    app.firstImageShown();
    return showDocuments(entry);
  }
  ui.document.hidden = true;
  ui.document.replaceChildren();
  ui.viewport.classList.remove("showing-document");
  const sameSeries = previous === entry;
  app.index = keepIndex ? Math.min(app.index, entry.slices.length - 1) : 0;
  ui.preset.value = entry.presetName;
  app.measurement = "";
  if (!sameSeries) app.viewport.resetView(false);
  await showSlice(app.index, { force: true });
}

// The window a data set asks for (first Window Center/Width), else one spanning its
// stored range through the Modality LUT (a starting point for dragging).
function storedWindow(ds) {
  if (!ds) return null;
  const center = numbers(ds, TAG.WindowCenter)[0];
  const width = numbers(ds, TAG.WindowWidth)[0];
  if (Number.isFinite(center) && width > 0) return { center, width, stored: true };
  return null;
}

function fallbackWindow(ds) {
  const bits = number(ds, TAG.BitsStored) || 8;
  const slope = number(ds, TAG.RescaleSlope) ?? 1;
  const intercept = number(ds, TAG.RescaleIntercept) ?? 0;
  const signed = number(ds, TAG.PixelRepresentation) === 1;
  const low = signed ? -(2 ** (bits - 1)) : 0;
  const high = signed ? 2 ** (bits - 1) - 1 : 2 ** bits - 1;
  return { center: ((low + high) / 2) * slope + intercept, width: (high - low) * slope };
}

// -- slices ----------------------------------------------------------------------------
function request(entry, slice) {
  const windowing = entry.windowing?.stored ? null : entry.windowing;
  return {
    study: app.study,
    series: entry.uid,
    sop: text(slice.ds, TAG.SOPInstanceUID),
    frame: slice.frame,
    windowing: windowing ? { center: windowing.center, width: windowing.width } : null,
  };
}

async function showSlice(index, { force = false } = {}) {
  const entry = app.current;
  if (!entry || entry.kind !== "image" || !entry.slices.length) return;
  const clamped = Math.max(0, Math.min(entry.slices.length - 1, index));
  if (clamped === app.index && !force) return;
  app.index = clamped;
  const slice = entry.slices[clamped];
  const req = request(entry, slice);
  updateOverlays();
  updateAttributes(slice.ds);
  const cached = app.frames.has(req);
  if (!cached) ui.busy.hidden = false;
  // Neighbours are fetched once this slice is on screen, so they never delay it.
  if (cached) prefetch(entry, clamped);
  let bitmap;
  try {
    bitmap = await app.frames.get(req);
  } catch (error) {
    if (app.current === entry && app.index === clamped) {
      ui.busy.hidden = true;
      fail(error, () => {
        clearState();
        showSlice(clamped, { force: true });
      });
    }
    return;
  }
  if (app.current !== entry || app.index !== clamped) return;
  ui.busy.hidden = true;
  const columns = number(slice.ds, TAG.Columns) || bitmap.width;
  const rows = number(slice.ds, TAG.Rows) || bitmap.height;
  app.viewport.show({
    bitmap,
    columns,
    rows,
    spacing: spacing(slice.ds),
    window: entry.windowing || fallbackWindow(slice.ds),
    key: `${req.sop}/${req.frame}`,
  });
  ui.canvas.dataset.slice = String(clamped);
  ui.canvas.dataset.sop = req.sop;
  ui.canvas.dataset.window = req.windowing ? `${req.windowing.center},${req.windowing.width}` : "stored";
  ui.canvas.dataset.ready = "true";
  app.firstImageShown();
  if (!cached) prefetch(entry, clamped);
}

function prefetch(entry, index) {
  const wanted = [];
  for (let d = 1; d <= PREFETCH; d++) {
    for (const i of [index + d, index - d]) {
      if (i >= 0 && i < entry.slices.length) wanted.push(request(entry, entry.slices[i]));
    }
  }
  app.frames.prefetch(wanted);
}

// -- window/level ----------------------------------------------------------------------
function setWindow(windowing, { final = true, preset = "custom" } = {}) {
  const entry = app.current;
  if (!entry || entry.kind !== "image") return;
  if (!final) {
    app.previewWindow = windowing;
    updateOverlays();
    return;
  }
  app.previewWindow = null;
  entry.windowing = windowing;
  entry.presetName = preset;
  ui.preset.value = preset;
  showSlice(app.index, { force: true });
}

function applyPreset(name) {
  const entry = app.current;
  if (!entry || entry.kind !== "image") return;
  if (name === "default") {
    setWindow(storedWindow(entry.slices[0]?.ds), { preset: "default" });
  } else if (PRESETS[name]) {
    setWindow({ ...PRESETS[name] }, { preset: name });
  }
}

// -- overlays and details --------------------------------------------------------------
function lines(el, list) {
  el.replaceChildren(
    ...list.filter(Boolean).map((line) => {
      const div = document.createElement("div");
      div.textContent = line;
      return div;
    }),
  );
}

function updateOverlays() {
  const entry = app.current;
  if (!entry || entry.kind !== "image" || !entry.slices.length) return;
  const slice = entry.slices[app.index];
  const ds = slice.ds;
  const study = app.studyDs || {};
  lines(ui["ov-tl"], [
    text(ds, TAG.PatientName) || text(study, TAG.PatientName),
    text(ds, TAG.PatientID),
    [formatDate(text(ds, TAG.PatientBirthDate)), text(ds, TAG.PatientSex)].filter(Boolean).join(" "),
  ]);
  lines(ui["ov-tr"], [
    text(ds, TAG.InstitutionName),
    text(ds, TAG.StudyDescription),
    [formatDate(text(ds, TAG.StudyDate)), formatTime(text(ds, TAG.StudyTime))].filter(Boolean).join(" "),
    [text(ds, TAG.Modality), text(ds, TAG.SeriesNumber) && `#${text(ds, TAG.SeriesNumber)}`, text(ds, TAG.SeriesDescription)]
      .filter(Boolean)
      .join(" "),
  ]);
  const shown = app.previewWindow || entry.windowing || storedWindow(ds);
  lines(ui["ov-bl"], [
    t("overlay.image", { n: app.index + 1, total: entry.slices.length }) +
      (slice.frames > 1 ? ` · ${t("overlay.frame", { n: slice.frame, total: slice.frames })}` : ""),
    shown ? t("overlay.window", { w: Math.round(shown.width), l: Math.round(shown.center) }) : t("overlay.window.auto"),
  ]);
  const zoom = document.createElement("div");
  zoom.className = "zoom";
  ui["ov-bl"].append(zoom);
  updateZoom();
  const thickness = number(ds, TAG.SliceThickness);
  const location = number(ds, TAG.SliceLocation) ?? numbers(ds, TAG.ImagePositionPatient)[2];
  const s = spacing(ds);
  lines(ui["ov-br"], [
    app.measurement ? t("overlay.length", { value: app.measurement }) : "",
    thickness ? t("overlay.thickness", { mm: formatNumber(thickness, 1) }) : "",
    location !== undefined && location !== null ? t("overlay.location", { mm: formatNumber(location, 1) }) : "",
    s?.kind === "detector" ? t("overlay.detector-spacing") : "",
  ]);
  ui["ov-br"].dataset.length = app.measurement;
  const markers = orientationMarkers(numbers(ds, TAG.ImageOrientationPatient));
  for (const side of ["top", "bottom", "left", "right"]) ui[`or-${side}`].textContent = markers ? markers[side] : "";
  const lossy = lossiness(ds);
  ui.lossy.hidden = !lossy.lossy;
  ui.notice.hidden = !lossy.lossy;
  if (lossy.lossy) {
    const ratio = lossy.ratio ? ` ${formatNumber(lossy.ratio, 1)}:1` : "";
    ui.lossy.textContent = t("lossy.badge") + ratio;
    ui.lossy.title = lossy.method || lossy.syntax || "";
    ui.notice.textContent = t("lossy.notice");
  }
}

function updateZoom() {
  const zoom = ui["ov-bl"].querySelector(".zoom");
  if (zoom) zoom.textContent = t("overlay.zoom", { z: formatNumber(app.viewport.zoom, 1) });
}

function updateAttributes(ds) {
  const study = app.studyDs || {};
  const s = spacing(ds);
  const rows = [
    ["attrs.patient", text(ds, TAG.PatientName) || text(study, TAG.PatientName)],
    ["attrs.patientId", text(ds, TAG.PatientID)],
    ["attrs.birthDate", formatDate(text(ds, TAG.PatientBirthDate))],
    ["attrs.sex", text(ds, TAG.PatientSex)],
    ["attrs.studyDate", [formatDate(text(ds, TAG.StudyDate)), formatTime(text(ds, TAG.StudyTime))].join(" ").trim()],
    ["attrs.studyDescription", text(ds, TAG.StudyDescription)],
    ["attrs.accession", text(ds, TAG.AccessionNumber)],
    ["attrs.institution", text(ds, TAG.InstitutionName)],
    ["attrs.referring", text(ds, TAG.ReferringPhysicianName)],
    ["attrs.modality", text(ds, TAG.Modality)],
    ["attrs.series", [text(ds, TAG.SeriesNumber), text(ds, TAG.SeriesDescription)].filter(Boolean).join(" · ")],
    ["attrs.bodyPart", text(ds, TAG.BodyPartExamined)],
    ["attrs.instance", text(ds, TAG.InstanceNumber)],
    ["attrs.matrix", number(ds, TAG.Rows) ? `${number(ds, TAG.Columns)} × ${number(ds, TAG.Rows)}` : ""],
    ["attrs.spacing", s ? `${s.rows} / ${s.columns} mm` : ""],
    ["attrs.thickness", text(ds, TAG.SliceThickness) && `${text(ds, TAG.SliceThickness)} mm`],
    ["attrs.orientation", values(ds, TAG.ImageOrientationPatient).map((v) => Number(v).toFixed(2)).join(" ")],
    ["attrs.transferSyntax", text(ds, TAG.AvailableTransferSyntaxUID)],
    ["attrs.lossy", lossiness(ds).lossy ? t("attrs.yes") : t("attrs.no")],
    ["attrs.sopClass", text(ds, TAG.SOPClassUID)],
  ];
  ui["attr-list"].replaceChildren();
  for (const [key, value] of rows) {
    if (!value) continue;
    const dt = document.createElement("dt");
    dt.textContent = t(key);
    const dd = document.createElement("dd");
    dd.textContent = value;
    ui["attr-list"].append(dt, dd);
  }
}

// -- reports (SR, Encapsulated PDF) ----------------------------------------------------
async function showDocuments(entry) {
  ui.viewport.classList.add("showing-document");
  app.viewport.clear();
  ui.notice.hidden = true;
  ui.lossy.hidden = true;
  for (const id of ["ov-tl", "ov-tr", "ov-bl", "ov-br", "or-top", "or-bottom", "or-left", "or-right"]) {
    ui[id].replaceChildren();
  }
  ui.document.hidden = false;
  ui.document.replaceChildren();
  if (entry.instances[0]) updateAttributes(entry.instances[0]);
  for (const ds of entry.instances) {
    const kind = documentKind(ds);
    if (kind === "sr") {
      ui.document.append(renderReport(ds));
    } else if (kind === "pdf") {
      ui.document.append(await pdfView(ds));
    } else {
      const p = document.createElement("p");
      p.textContent = t("report.unsupported", { sopClass: text(ds, TAG.SOPClassUID) });
      ui.document.append(p);
    }
  }
}

async function pdfView(ds) {
  const figure = document.createElement("figure");
  figure.className = "pdf";
  const caption = document.createElement("figcaption");
  caption.textContent = text(ds, TAG.DocumentTitle) || t("report.pdf");
  figure.append(caption);
  const element = ds[TAG.EncapsulatedDocument] || {};
  let bytes;
  try {
    if (element.InlineBinary) {
      bytes = Uint8Array.from(atob(element.InlineBinary), (c) => c.charCodeAt(0));
    } else if (element.BulkDataURI) {
      bytes = await app.api.bulk(element.BulkDataURI);
    } else {
      throw new ApiError("notfound", 404, "no document");
    }
  } catch (error) {
    const p = document.createElement("p");
    p.textContent = t("report.pdf.failed", { reason: error.message || "" });
    figure.append(p);
    return figure;
  }
  // The stored value may carry one padding byte after %%EOF; PDF readers ignore it.
  const url = URL.createObjectURL(new Blob([bytes], { type: "application/pdf" }));
  const frame = document.createElement("iframe");
  frame.src = url;
  frame.title = caption.textContent;
  const link = document.createElement("a");
  link.href = url;
  link.download = `${text(ds, TAG.SOPInstanceUID)}.pdf`;
  link.textContent = t("report.pdf.download");
  figure.append(frame, link);
  return figure;
}

// -- input -----------------------------------------------------------------------------
function setTool(tool) {
  app.viewport.setTool(tool);
  for (const button of document.querySelectorAll("button.tool")) {
    button.setAttribute("aria-pressed", String(button.dataset.tool === tool));
  }
}

function bindToolbar() {
  for (const button of document.querySelectorAll("button.tool")) {
    button.addEventListener("click", () => setTool(button.dataset.tool));
  }
  ui.preset.addEventListener("change", () => applyPreset(ui.preset.value));
  $("reset").addEventListener("click", () => {
    app.viewport.resetView();
    applyPreset("default");
  });
  $("clear").addEventListener("click", () => app.viewport.clearMeasurements());
  $("toggle-info").addEventListener("click", (e) => {
    const open = document.body.classList.toggle("details-open");
    e.currentTarget.setAttribute("aria-pressed", String(open));
  });
}

function bindKeys() {
  document.addEventListener("keydown", (e) => {
    if (e.altKey || e.metaKey || e.ctrlKey) return;
    const target = e.target;
    if (target instanceof HTMLSelectElement || target instanceof HTMLInputElement) return;
    if (ui.viewer.hidden || app.current?.kind !== "image") return;
    const tools = { s: "scroll", w: "window", p: "pan", z: "zoom", m: "measure" };
    let handled = true;
    switch (e.key) {
      case "ArrowDown":
      case "ArrowRight":
        showSlice(app.index + 1);
        break;
      case "ArrowUp":
      case "ArrowLeft":
        showSlice(app.index - 1);
        break;
      case "PageDown":
        showSlice(app.index + 10);
        break;
      case "PageUp":
        showSlice(app.index - 10);
        break;
      case "Home":
        showSlice(0);
        break;
      case "End":
        showSlice(app.current.slices.length - 1);
        break;
      case "+":
      case "=":
        app.viewport.zoomBy(1.25);
        updateOverlays();
        break;
      case "-":
        app.viewport.zoomBy(0.8);
        updateOverlays();
        break;
      case "r":
        app.viewport.resetView();
        updateOverlays();
        break;
      case "0":
        applyPreset("default");
        break;
      case "Escape":
        setTool("scroll");
        break;
      case "Delete":
        app.viewport.clearMeasurements();
        break;
      default:
        if (/^[1-4]$/.test(e.key)) {
          const name = PRESET_KEYS[Number(e.key) - 1];
          ui.preset.value = name;
          applyPreset(name);
        } else if (tools[e.key]) {
          setTool(tools[e.key]);
        } else {
          handled = false;
        }
    }
    // Keys that move the page only when the image has focus, so Tab and scrolling
    // of the side panels still work elsewhere.
    if (handled && (ui.viewport.contains(target) || !e.key.startsWith("Arrow"))) e.preventDefault();
  });
}

// -- language switch -------------------------------------------------------------------
function refreshTexts() {
  translate(document);
  if (app.actions) renderActions(ui["study-actions"], app.study, app.actions, say);
  if (app.stateName) showState(ui.state, app.stateName, app.stateOptions || {});
  if (app.current) {
    renderSeriesList();
    if (app.current.kind === "image" && app.current.slices.length) {
      updateOverlays();
      updateAttributes(app.current.slices[app.index].ds);
    } else if (app.current.kind) {
      showDocuments(app.current);
    }
  }
}

main().catch((error) => {
  console.error(error);
  fail(error, () => location.reload());
});
