// Reading DICOM JSON (PS3.18 F.2) objects, and what the viewer derives from them:
// slice order, pixel spacing, orientation markers, lossy compression.

export const TAG = {
  SpecificCharacterSet: "00080005",
  ImageType: "00080008",
  SOPClassUID: "00080016",
  SOPInstanceUID: "00080018",
  StudyDate: "00080020",
  StudyTime: "00080030",
  AccessionNumber: "00080050",
  Modality: "00080060",
  ModalitiesInStudy: "00080061",
  InstitutionName: "00080080",
  ReferringPhysicianName: "00080090",
  StudyDescription: "00081030",
  SeriesDescription: "0008103E",
  ConceptNameCodeSequence: "0040A043",
  CodeValue: "00080100",
  CodeMeaning: "00080104",
  AvailableTransferSyntaxUID: "00083002",
  PatientName: "00100010",
  PatientID: "00100020",
  PatientBirthDate: "00100030",
  PatientSex: "00100040",
  BodyPartExamined: "00180015",
  SliceThickness: "00180050",
  ImagerPixelSpacing: "00181164",
  StudyInstanceUID: "0020000D",
  SeriesInstanceUID: "0020000E",
  SeriesNumber: "00200011",
  InstanceNumber: "00200013",
  ImagePositionPatient: "00200032",
  ImageOrientationPatient: "00200037",
  SliceLocation: "00201041",
  NumberOfStudyRelatedSeries: "00201206",
  NumberOfStudyRelatedInstances: "00201208",
  NumberOfSeriesRelatedInstances: "00201209",
  SamplesPerPixel: "00280002",
  PhotometricInterpretation: "00280004",
  NumberOfFrames: "00280008",
  Rows: "00280010",
  Columns: "00280011",
  PixelSpacing: "00280030",
  BitsStored: "00280101",
  PixelRepresentation: "00280103",
  WindowCenter: "00281050",
  WindowWidth: "00281051",
  RescaleIntercept: "00281052",
  RescaleSlope: "00281053",
  LossyImageCompression: "00282110",
  LossyImageCompressionRatio: "00282112",
  LossyImageCompressionMethod: "00282114",
  PixelData: "7FE00010",
  EncapsulatedDocument: "00420011",
  MIMETypeOfEncapsulatedDocument: "00420012",
  DocumentTitle: "00420010",
  ContentDate: "00080023",
  ContentTime: "00080033",
  CompletionFlag: "0040A491",
  VerificationFlag: "0040A493",
};

export function values(ds, tag) {
  const element = ds?.[tag];
  return element && Array.isArray(element.Value) ? element.Value : [];
}

export function first(ds, tag) {
  return values(ds, tag)[0];
}

export function text(ds, tag) {
  const value = first(ds, tag);
  if (value === undefined || value === null) return "";
  if (typeof value === "object") return personName(value);
  return String(value);
}

export function numbers(ds, tag) {
  return values(ds, tag).map(Number).filter(Number.isFinite);
}

export function number(ds, tag) {
  const value = Number(first(ds, tag));
  return Number.isFinite(value) ? value : null;
}

// A PN value object: the alphabetic group as "Family, Given"; ideographic (e.g.
// Hangul or Hanja) alongside when present.
export function personName(pn) {
  const format = (group) => {
    if (!group) return "";
    const [family = "", given = "", middle = "", prefix = "", suffix = ""] = group.split("^");
    const main = [family, [given, middle].filter(Boolean).join(" ")].filter(Boolean).join(", ");
    return [prefix, main, suffix].filter(Boolean).join(" ");
  };
  const alphabetic = format(pn.Alphabetic);
  const ideographic = pn.Ideographic ? pn.Ideographic.replaceAll("^", " ").trim() : "";
  if (alphabetic && ideographic) return `${alphabetic} (${ideographic})`;
  return alphabetic || ideographic || format(pn.Phonetic);
}

export function formatDate(da) {
  const match = /^(\d{4})(\d{2})(\d{2})$/.exec(String(da || ""));
  return match ? `${match[1]}-${match[2]}-${match[3]}` : String(da || "");
}

export function formatTime(tm) {
  const match = /^(\d{2})(\d{2})?/.exec(String(tm || ""));
  return match ? `${match[1]}:${match[2] || "00"}` : "";
}

// Transfer syntaxes whose pixel data went through lossy compression (PS3.5 A.4,
// PS3.6 Table A-1): JPEG baseline/extended, JPEG 2000 (the "any" one may be
// lossy), JPEG-LS near-lossless, JPEG XL, HTJ2K (general), MPEG and HEVC video.
const LOSSY_SYNTAXES = new Set([
  "1.2.840.10008.1.2.4.50",
  "1.2.840.10008.1.2.4.51",
  "1.2.840.10008.1.2.4.81",
  "1.2.840.10008.1.2.4.91",
  "1.2.840.10008.1.2.4.203",
  "1.2.840.10008.1.2.4.112",
  "1.2.840.10008.1.2.4.202",
  "1.2.840.10008.1.2.4.100",
  "1.2.840.10008.1.2.4.100.1",
  "1.2.840.10008.1.2.4.101",
  "1.2.840.10008.1.2.4.101.1",
  "1.2.840.10008.1.2.4.102",
  "1.2.840.10008.1.2.4.102.1",
  "1.2.840.10008.1.2.4.103",
  "1.2.840.10008.1.2.4.103.1",
  "1.2.840.10008.1.2.4.104",
  "1.2.840.10008.1.2.4.104.1",
  "1.2.840.10008.1.2.4.105",
  "1.2.840.10008.1.2.4.105.1",
  "1.2.840.10008.1.2.4.106",
  "1.2.840.10008.1.2.4.106.1",
  "1.2.840.10008.1.2.4.107",
  "1.2.840.10008.1.2.4.108",
]);

// {lossy, ratio, method, reason}: Lossy Image Compression "01" says the pixels were
// lossy compressed at some time (PS3.3 C.7.6.1.1.5), even when stored losslessly now;
// a lossy transfer syntax says so for the stored bytes.
export function lossiness(ds) {
  const flag = text(ds, TAG.LossyImageCompression).trim();
  const syntax = text(ds, TAG.AvailableTransferSyntaxUID).trim();
  const ratio = numbers(ds, TAG.LossyImageCompressionRatio)[0] ?? null;
  const method = values(ds, TAG.LossyImageCompressionMethod).join(", ");
  if (flag === "01") return { lossy: true, ratio, method, reason: "attribute" };
  if (LOSSY_SYNTAXES.has(syntax) && flag !== "00") {
    return { lossy: true, ratio, method, reason: "transfer-syntax", syntax };
  }
  return { lossy: false };
}

// Spacing of the pixels in mm: [between rows (vertical), between columns
// (horizontal)] from Pixel Spacing, else Imager Pixel Spacing (at the detector).
export function spacing(ds) {
  const pixel = numbers(ds, TAG.PixelSpacing);
  if (pixel.length === 2 && pixel[0] > 0 && pixel[1] > 0) return { rows: pixel[0], columns: pixel[1], kind: "patient" };
  const imager = numbers(ds, TAG.ImagerPixelSpacing);
  if (imager.length === 2 && imager[0] > 0 && imager[1] > 0) return { rows: imager[0], columns: imager[1], kind: "detector" };
  return null;
}

// The patient direction of a unit vector as letters, strongest axis first (PS3.3
// C.7.6.1.1.1): +x is the patient's left, +y posterior, +z head.
export function directionLetters(vector) {
  const names = [
    ["R", "L"],
    ["A", "P"],
    ["F", "H"],
  ];
  const axes = vector
    .map((v, i) => ({ v, i }))
    .filter(({ v }) => Math.abs(v) > 0.25)
    .sort((a, b) => Math.abs(b.v) - Math.abs(a.v))
    .slice(0, 2);
  return axes.map(({ v, i }) => names[i][v > 0 ? 1 : 0]).join("");
}

function opposite(letters) {
  const swap = { R: "L", L: "R", A: "P", P: "A", H: "F", F: "H" };
  return [...letters].map((c) => swap[c]).join("");
}

// Markers for the four edges of an image with this Image Orientation (Patient):
// the row vector points from the left edge to the right, the column vector from
// the top edge to the bottom.
export function orientationMarkers(iop) {
  if (!iop || iop.length !== 6) return null;
  const right = directionLetters(iop.slice(0, 3));
  const bottom = directionLetters(iop.slice(3, 6));
  if (!right || !bottom) return null;
  return { left: opposite(right), right, top: opposite(bottom), bottom };
}

// Instances of an image series as slices (one per frame), ordered along the
// slice normal when positions are known, else by Instance Number.
export function slicesOf(instances) {
  const withPixels = instances.filter((ds) => ds[TAG.PixelData] || number(ds, TAG.Rows));
  const sortKey = (ds) => {
    const iop = numbers(ds, TAG.ImageOrientationPatient);
    const ipp = numbers(ds, TAG.ImagePositionPatient);
    if (iop.length === 6 && ipp.length === 3) {
      const n = [
        iop[1] * iop[5] - iop[2] * iop[4],
        iop[2] * iop[3] - iop[0] * iop[5],
        iop[0] * iop[4] - iop[1] * iop[3],
      ];
      return n[0] * ipp[0] + n[1] * ipp[1] + n[2] * ipp[2];
    }
    return null;
  };
  const keyed = withPixels.map((ds) => ({ ds, key: sortKey(ds), n: number(ds, TAG.InstanceNumber) ?? 0 }));
  const byPosition = keyed.every((k) => k.key !== null) && new Set(keyed.map((k) => k.key)).size === keyed.length;
  keyed.sort((a, b) => (byPosition ? a.key - b.key : a.n - b.n));
  const slices = [];
  for (const { ds } of keyed) {
    const frames = number(ds, TAG.NumberOfFrames) || 1;
    for (let f = 1; f <= frames; f++) slices.push({ ds, frame: f, frames });
  }
  return slices;
}

export const SR_CLASSES = new Set([
  "1.2.840.10008.5.1.4.1.1.88.11",
  "1.2.840.10008.5.1.4.1.1.88.22",
  "1.2.840.10008.5.1.4.1.1.88.33",
  "1.2.840.10008.5.1.4.1.1.88.34",
  "1.2.840.10008.5.1.4.1.1.88.35",
  "1.2.840.10008.5.1.4.1.1.88.50",
  "1.2.840.10008.5.1.4.1.1.88.59",
  "1.2.840.10008.5.1.4.1.1.88.65",
  "1.2.840.10008.5.1.4.1.1.88.67",
  "1.2.840.10008.5.1.4.1.1.88.68",
  "1.2.840.10008.5.1.4.1.1.88.69",
  "1.2.840.10008.5.1.4.1.1.88.70",
  "1.2.840.10008.5.1.4.1.1.88.71",
  "1.2.840.10008.5.1.4.1.1.88.72",
  "1.2.840.10008.5.1.4.1.1.88.73",
  "1.2.840.10008.5.1.4.1.1.88.74",
  "1.2.840.10008.5.1.4.1.1.88.75",
  "1.2.840.10008.5.1.4.1.1.88.76",
]);
export const PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1";

export function documentKind(ds) {
  const cls = text(ds, TAG.SOPClassUID);
  if (SR_CLASSES.has(cls)) return "sr";
  if (cls === PDF_CLASS || text(ds, TAG.MIMETypeOfEncapsulatedDocument) === "application/pdf") return "pdf";
  return null;
}
