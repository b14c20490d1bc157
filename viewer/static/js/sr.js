// A DICOM Structured Report (PS3.3 C.17.3) as readable text: the content tree of
// the metadata's Content Sequence, containers as headings, other items as
// "Concept: value" lines. Built with DOM nodes (textContent), never HTML strings.

import { first, formatDate, formatTime, personName, text, values } from "./dicom.js";
import { t } from "./i18n.js";

const T = {
  ContentSequence: "0040A730",
  RelationshipType: "0040A010",
  ValueType: "0040A040",
  ConceptNameCodeSequence: "0040A043",
  ConceptCodeSequence: "0040A168",
  CodeMeaning: "00080104",
  CodeValue: "00080100",
  TextValue: "0040A160",
  DateTime: "0040A120",
  Date: "0040A121",
  Time: "0040A122",
  PersonName: "0040A123",
  UID: "0040A124",
  MeasuredValueSequence: "0040A300",
  NumericValue: "0040A30A",
  MeasurementUnitsCodeSequence: "004008EA",
  ReferencedSOPSequence: "00081199",
  ReferencedSOPInstanceUID: "00081155",
};

function meaning(item, sequence) {
  const code = first(item, sequence);
  return code ? text(code, T.CodeMeaning) || text(code, T.CodeValue) : "";
}

function valueOf(item) {
  switch (text(item, T.ValueType)) {
    case "TEXT":
      return text(item, T.TextValue);
    case "CODE":
      return meaning(item, T.ConceptCodeSequence);
    case "NUM": {
      const measured = first(item, T.MeasuredValueSequence);
      if (!measured) return "";
      const unit = first(measured, T.MeasurementUnitsCodeSequence);
      const unitText = unit ? text(unit, T.CodeValue) : "";
      return [text(measured, T.NumericValue), unitText === "1" ? "" : unitText].filter(Boolean).join(" ");
    }
    case "DATETIME":
      return text(item, T.DateTime);
    case "DATE":
      return formatDate(text(item, T.Date));
    case "TIME":
      return formatTime(text(item, T.Time));
    case "PNAME": {
      const pn = first(item, T.PersonName);
      return pn ? personName(pn) : "";
    }
    case "UIDREF":
      return text(item, T.UID);
    case "IMAGE":
    case "COMPOSITE": {
      const ref = first(item, T.ReferencedSOPSequence);
      return ref ? t("report.reference", { uid: text(ref, T.ReferencedSOPInstanceUID) }) : "";
    }
    default:
      return "";
  }
}

function renderItems(items, parent, depth) {
  for (const item of items) {
    const name = meaning(item, T.ConceptNameCodeSequence);
    const children = values(item, T.ContentSequence);
    if (text(item, T.ValueType) === "CONTAINER") {
      const section = document.createElement("section");
      if (name) {
        const heading = document.createElement(depth < 2 ? "h3" : "h4");
        heading.textContent = name;
        section.append(heading);
      }
      renderItems(children, section, depth + 1);
      parent.append(section);
      continue;
    }
    const p = document.createElement("p");
    const value = valueOf(item);
    if (name) {
      const label = document.createElement("strong");
      label.textContent = `${name}: `;
      p.append(label);
    }
    p.append(document.createTextNode(value));
    // Long text keeps its line breaks.
    p.className = "sr-item";
    parent.append(p);
    if (children.length) {
      const nested = document.createElement("div");
      nested.className = "sr-nested";
      renderItems(children, nested, depth + 1);
      parent.append(nested);
    }
  }
}

// The whole report: title (the root concept), status flags, then the content tree.
export function renderReport(ds) {
  const article = document.createElement("article");
  article.className = "report";
  const title = document.createElement("h2");
  title.textContent = meaning(ds, T.ConceptNameCodeSequence) || t("report.untitled");
  article.append(title);
  const status = document.createElement("p");
  status.className = "report-status";
  const completion = text(ds, "0040A491");
  const verification = text(ds, "0040A493");
  const date = formatDate(text(ds, "00080023"));
  status.textContent = [
    date,
    completion && t(`report.completion.${completion.toLowerCase()}`),
    verification && t(`report.verification.${verification.toLowerCase()}`),
  ]
    .filter(Boolean)
    .join(" · ");
  article.append(status);
  renderItems(values(ds, T.ContentSequence), article, 1);
  return article;
}
