// A small DICOMweb client for the viewer: QIDO-RS, metadata, rendered frames,
// thumbnails and bulk data, all with the Bearer header. Failures become ApiError
// with a kind the page turns into a state: "unavailable" (network, 5xx),
// "unauthorized" (401: the access ended), "forbidden" (403), "notfound", "failed".

import { authHeaders } from "./auth.js";

export class ApiError extends Error {
  // reason: the server's short code ("error" of the JSON body), e.g. token-revoked.
  constructor(kind, status, message, reason = "") {
    super(message);
    this.kind = kind;
    this.status = status;
    this.reason = reason;
  }
}

function kindOf(status) {
  if (status === 401) return "unauthorized";
  if (status === 403) return "forbidden";
  if (status === 404) return "notfound";
  if (status >= 500 || status === 429) return "unavailable";
  return "failed";
}

export class DicomWeb {
  constructor(base) {
    this.base = base.replace(/\/$/, "");
  }

  url(path, params = {}) {
    const url = new URL(this.base + path, location.origin);
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
    }
    return url;
  }

  async request(url, accept, signal) {
    let response;
    try {
      response = await fetch(url, {
        headers: authHeaders({ Accept: accept }),
        signal,
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("unavailable", 0, String(error.message || error));
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      let reason = "";
      try {
        const body = await response.json();
        message = body.message || body.detail || message;
        reason = typeof body.error === "string" ? body.error : "";
      } catch {
        /* not JSON */
      }
      throw new ApiError(kindOf(response.status), response.status, message, reason);
    }
    return response;
  }

  async json(path, params = {}) {
    const response = await this.request(this.url(path, params), "application/dicom+json");
    if (response.status === 204) return [];
    return response.json();
  }

  studies(params) {
    return this.json("/studies", { includefield: "all", ...params });
  }

  series(study) {
    return this.json(`/studies/${study}/series`, { includefield: "all" });
  }

  seriesMetadata(study, series) {
    return this.json(`/studies/${study}/series/${series}/metadata`);
  }

  // A frame rendered by the server (PS3.18 rendered resources) with the window asked
  // for (null: the data set's own), decoded into an ImageBitmap.
  async frame(study, series, sop, number, windowing, signal) {
    const params = windowing ? { window: `${windowing.center},${windowing.width}` } : {};
    const path = `/studies/${study}/series/${series}/instances/${sop}/frames/${number}/rendered`;
    const response = await this.request(this.url(path, params), "image/png", signal);
    return createImageBitmap(await response.blob());
  }

  async thumbnail(study, series) {
    const path = `/studies/${study}/series/${series}/thumbnail`;
    const response = await this.request(this.url(path, { viewport: "128,128" }), "image/jpeg");
    return response.blob();
  }

  // A bulk data value (BulkDataURI of the metadata) as bytes. The URI is read as a
  // path on this server: the page talks to its own origin only.
  async bulk(uri) {
    const url = new URL(new URL(uri, location.origin).pathname, location.origin);
    const response = await this.request(url, "multipart/related; type=\"application/octet-stream\"");
    const type = response.headers.get("Content-Type") || "";
    const bytes = new Uint8Array(await response.arrayBuffer());
    return type.startsWith("multipart/") ? firstPart(bytes, type) : bytes;
  }
}

// The body of the first part of a multipart/related response.
export function firstPart(bytes, contentType) {
  const match = /boundary="?([^";]+)"?/i.exec(contentType);
  if (!match) throw new ApiError("failed", 0, "multipart response without a boundary");
  const delimiter = new TextEncoder().encode(`--${match[1]}`);
  const start = indexOf(bytes, delimiter, 0);
  if (start < 0) throw new ApiError("failed", 0, "multipart boundary not found");
  const headersEnd = indexOf(bytes, new TextEncoder().encode("\r\n\r\n"), start);
  const next = indexOf(bytes, new TextEncoder().encode(`\r\n--${match[1]}`), headersEnd + 4);
  if (headersEnd < 0 || next < 0) throw new ApiError("failed", 0, "truncated multipart response");
  return bytes.subarray(headersEnd + 4, next);
}

function indexOf(haystack, needle, from) {
  outer: for (let i = from; i <= haystack.length - needle.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}
