// The image viewport: one canvas showing the current frame with zoom, pan, a window
// preview while dragging, length measurements, and pointer/wheel input.
//
// Images arrive as 8-bit renderings made by the server with a known window. While
// the user drags the window, the page remaps those 8-bit values to the new window
// at once (an approximation: values outside the old window are clipped); when the
// drag ends the page asks the server for the exact rendering.
//
// Coordinates: image space is in pixels (column, row; pixel i covers [i, i+1]);
// the display keeps the physical aspect ratio from Pixel Spacing, so a length is
// hypot(dcol * column spacing, drow * row spacing).

const MIN_ZOOM = 0.25;
const MAX_ZOOM = 16;

export class Viewport {
  constructor(canvas, callbacks) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.callbacks = callbacks; // onScroll(delta), onWindow(window, final), onMeasure(text)
    this.tool = "scroll";
    this.image = null; // {bitmap, columns, rows, spacing, window, key}
    this.zoom = 1;
    this.pan = { x: 0, y: 0 };
    this.preview = null; // window shown by remapping while dragging
    this.measurements = new Map(); // image key -> [{a, b}]
    this.drawing = null; // measurement being drawn
    this.drag = null;
    this.pointers = new Map(); // pointer id -> position, for two-finger gestures
    this.pinch = null;
    this.formatLength = (mm) => `${mm.toFixed(1)} mm`;
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(canvas.parentElement);
    this.bindInput();
    this.resize();
  }

  resize() {
    const box = this.canvas.parentElement.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    this.cssWidth = Math.max(1, Math.round(box.width));
    this.cssHeight = Math.max(1, Math.round(box.height));
    this.canvas.width = Math.round(this.cssWidth * ratio);
    this.canvas.height = Math.round(this.cssHeight * ratio);
    this.canvas.style.width = `${this.cssWidth}px`;
    this.canvas.style.height = `${this.cssHeight}px`;
    this.ratio = ratio;
    this.draw();
  }

  // A new image (same series: zoom and pan stay). keepView=false resets them.
  show(image, { keepView = true } = {}) {
    if (!keepView) this.resetView(false);
    if (this.image?.bitmap !== image.bitmap) this.pixels = null;
    this.image = image;
    this.preview = null;
    this.draw();
  }

  clear() {
    this.image = null;
    this.pixels = null;
    this.draw();
  }

  resetView(redraw = true) {
    this.zoom = 1;
    this.pan = { x: 0, y: 0 };
    if (redraw) this.draw();
  }

  zoomBy(factor) {
    this.zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, this.zoom * factor));
    this.draw();
  }

  setTool(tool) {
    this.tool = tool;
    this.canvas.dataset.tool = tool;
  }

  clearMeasurements() {
    if (this.image) this.measurements.delete(this.image.key);
    this.callbacks.onMeasure?.("");
    this.draw();
  }

  // -- geometry ------------------------------------------------------------------------
  aspect() {
    const s = this.image?.spacing;
    if (!s) return { x: 1, y: 1 };
    const unit = Math.min(s.rows, s.columns);
    return { x: s.columns / unit, y: s.rows / unit };
  }

  scale() {
    const { columns, rows } = this.image;
    const a = this.aspect();
    return Math.min(this.cssWidth / (columns * a.x), this.cssHeight / (rows * a.y)) * this.zoom;
  }

  toScreen(p) {
    const { columns, rows } = this.image;
    const a = this.aspect();
    const s = this.scale();
    return {
      x: this.cssWidth / 2 + this.pan.x + (p.x - columns / 2) * a.x * s,
      y: this.cssHeight / 2 + this.pan.y + (p.y - rows / 2) * a.y * s,
    };
  }

  toImage(p) {
    const { columns, rows } = this.image;
    const a = this.aspect();
    const s = this.scale();
    return {
      x: (p.x - this.cssWidth / 2 - this.pan.x) / (a.x * s) + columns / 2,
      y: (p.y - this.cssHeight / 2 - this.pan.y) / (a.y * s) + rows / 2,
    };
  }

  length(m) {
    const s = this.image.spacing;
    const dx = m.b.x - m.a.x;
    const dy = m.b.y - m.a.y;
    if (!s) return { value: Math.hypot(dx, dy), unit: "px" };
    return { value: Math.hypot(dx * s.columns, dy * s.rows), unit: "mm" };
  }

  lengthText(m) {
    const { value, unit } = this.length(m);
    return unit === "mm" ? this.formatLength(value) : `${value.toFixed(1)} px`;
  }

  // -- drawing -------------------------------------------------------------------------
  draw() {
    const ctx = this.ctx;
    ctx.setTransform(this.ratio, 0, 0, this.ratio, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, this.cssWidth, this.cssHeight);
    if (!this.image) return;
    const { columns, rows } = this.image;
    const topLeft = this.toScreen({ x: 0, y: 0 });
    const bottomRight = this.toScreen({ x: columns, y: rows });
    ctx.imageSmoothingEnabled = this.scale() < 3;
    ctx.imageSmoothingQuality = "high";
    const source = this.preview ? this.previewCanvas() : this.image.bitmap;
    ctx.drawImage(source, topLeft.x, topLeft.y, bottomRight.x - topLeft.x, bottomRight.y - topLeft.y);
    const list = [...(this.measurements.get(this.image.key) || [])];
    if (this.drawing) list.push(this.drawing);
    for (const m of list) this.drawMeasurement(m);
    this.callbacks.onDraw?.();
  }

  drawMeasurement(m) {
    const ctx = this.ctx;
    const a = this.toScreen(m.a);
    const b = this.toScreen(m.b);
    ctx.strokeStyle = "#ffd24a";
    ctx.fillStyle = "#ffd24a";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
    for (const p of [a, b]) {
      ctx.beginPath();
      ctx.arc(p.x, p.y, 3, 0, 2 * Math.PI);
      ctx.fill();
    }
    const label = this.lengthText(m);
    ctx.font = "13px system-ui, sans-serif";
    const width = ctx.measureText(label).width;
    const x = Math.min(Math.max(b.x + 8, 4), this.cssWidth - width - 8);
    const y = Math.min(Math.max(b.y - 8, 16), this.cssHeight - 4);
    ctx.fillStyle = "rgba(0,0,0,0.7)";
    ctx.fillRect(x - 3, y - 13, width + 6, 17);
    ctx.fillStyle = "#ffd24a";
    ctx.fillText(label, x, y);
  }

  // The current 8-bit image remapped from the window it was rendered with to the
  // preview window (linear VOI, PS3.3 C.11.2.1.2).
  previewCanvas() {
    const { bitmap, window: from } = this.image;
    if (!this.pixels) {
      const c = new OffscreenCanvas(bitmap.width, bitmap.height);
      const cx = c.getContext("2d", { willReadFrequently: true });
      cx.drawImage(bitmap, 0, 0);
      this.pixels = { canvas: c, ctx: cx, data: cx.getImageData(0, 0, bitmap.width, bitmap.height) };
    }
    const to = this.preview;
    const lut = new Uint8ClampedArray(256);
    for (let v = 0; v < 256; v++) {
      const value = from.center - from.width / 2 + (v / 255) * from.width;
      lut[v] = Math.round(((value - (to.center - to.width / 2)) / to.width) * 255);
    }
    const src = this.pixels.data.data;
    const out = new ImageData(bitmap.width, bitmap.height);
    const dst = out.data;
    for (let i = 0; i < src.length; i += 4) {
      dst[i] = lut[src[i]];
      dst[i + 1] = lut[src[i + 1]];
      dst[i + 2] = lut[src[i + 2]];
      dst[i + 3] = 255;
    }
    this.pixels.ctx.putImageData(out, 0, 0);
    return this.pixels.canvas;
  }

  // -- input ---------------------------------------------------------------------------
  bindInput() {
    const canvas = this.canvas;
    canvas.addEventListener("contextmenu", (e) => e.preventDefault());
    canvas.addEventListener(
      "wheel",
      (e) => {
        e.preventDefault();
        if (e.ctrlKey || this.tool === "zoom") {
          this.zoomAt(e, Math.exp(-e.deltaY / 500));
        } else {
          this.wheelRest = (this.wheelRest || 0) + e.deltaY;
          const steps = Math.trunc(this.wheelRest / 50) || Math.sign(this.wheelRest);
          this.wheelRest = 0;
          if (steps) this.callbacks.onScroll?.(steps);
        }
      },
      { passive: false },
    );
    canvas.addEventListener("pointerdown", (e) => this.pointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.pointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.pointerUp(e));
    canvas.addEventListener("pointercancel", (e) => this.pointerUp(e));
  }

  point(e) {
    const box = this.canvas.getBoundingClientRect();
    return { x: e.clientX - box.left, y: e.clientY - box.top };
  }

  zoomAt(e, factor) {
    if (!this.image) return;
    const p = this.point(e);
    const before = this.toImage(p);
    this.zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, this.zoom * factor));
    const after = this.toScreen(before);
    this.pan.x += p.x - after.x;
    this.pan.y += p.y - after.y;
    this.draw();
  }

  // Two fingers on a touch screen: pinch to zoom, move together to pan, whatever
  // the tool. Pointers are tracked by id; the gesture ends when one lifts.
  pinchStart() {
    const [a, b] = [...this.pointers.values()];
    this.drag = null;
    this.drawing = null;
    this.pinch = {
      distance: Math.max(1, Math.hypot(a.x - b.x, a.y - b.y)),
      middle: { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 },
      zoom: this.zoom,
      pan: { ...this.pan },
    };
  }

  pinchMove() {
    const [a, b] = [...this.pointers.values()];
    const p = this.pinch;
    const middle = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
    const factor = Math.hypot(a.x - b.x, a.y - b.y) / p.distance;
    // Keep the image point under the starting midpoint under the fingers' midpoint.
    this.zoom = p.zoom;
    this.pan = { ...p.pan };
    const anchor = this.toImage(p.middle);
    this.zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, p.zoom * factor));
    const moved = this.toScreen(anchor);
    this.pan.x += middle.x - moved.x;
    this.pan.y += middle.y - moved.y;
    this.draw();
  }

  pointerDown(e) {
    if (!this.image) return;
    this.pointers.set(e.pointerId, this.point(e));
    if (this.pointers.size === 2) {
      this.pinchStart();
      e.preventDefault();
      return;
    }
    if (this.pointers.size > 2 || this.pinch) return;
    this.canvas.setPointerCapture(e.pointerId);
    this.canvas.parentElement.focus({ preventScroll: true });
    const tool = e.button === 2 ? "window" : e.button === 1 ? "pan" : this.tool;
    const p = this.point(e);
    this.drag = { tool, start: p, last: p, scrolled: 0, window: this.image.window, zoom: this.zoom };
    if (tool === "measure") this.drawing = { a: this.toImage(p), b: this.toImage(p) };
    e.preventDefault();
  }

  pointerMove(e) {
    if (this.pointers.has(e.pointerId)) this.pointers.set(e.pointerId, this.point(e));
    if (this.pinch && this.pointers.size >= 2) {
      this.pinchMove();
      return;
    }
    const drag = this.drag;
    if (!drag || !this.image) return;
    const p = this.point(e);
    const dx = p.x - drag.last.x;
    const dy = p.y - drag.last.y;
    drag.last = p;
    switch (drag.tool) {
      case "pan":
        this.pan.x += dx;
        this.pan.y += dy;
        this.draw();
        break;
      case "zoom": {
        const total = p.y - drag.start.y;
        this.zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, drag.zoom * Math.exp(-total / 200)));
        this.draw();
        break;
      }
      case "window": {
        const base = drag.window;
        const sensitivity = Math.max(base.width / 300, 0.5);
        const width = Math.max(1, base.width + (p.x - drag.start.x) * sensitivity * 2);
        const center = base.center + (p.y - drag.start.y) * sensitivity;
        this.preview = { center: Math.round(center), width: Math.round(width) };
        this.callbacks.onWindow?.(this.preview, false);
        this.draw();
        break;
      }
      case "measure":
        this.drawing.b = this.toImage(p);
        this.callbacks.onMeasure?.(this.lengthText(this.drawing));
        this.draw();
        break;
      default: {
        // Stack scroll: one slice per 8 pixels of vertical drag.
        const wanted = Math.trunc((p.y - drag.start.y) / 8);
        if (wanted !== drag.scrolled) {
          this.callbacks.onScroll?.(wanted - drag.scrolled);
          drag.scrolled = wanted;
        }
      }
    }
  }

  pointerUp(e) {
    this.pointers.delete(e.pointerId);
    if (this.pinch) {
      if (this.pointers.size === 0) this.pinch = null;
      return;
    }
    const drag = this.drag;
    this.drag = null;
    if (!drag || !this.image) return;
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    if (drag.tool === "measure" && this.drawing) {
      const m = this.drawing;
      this.drawing = null;
      if (Math.hypot(m.b.x - m.a.x, m.b.y - m.a.y) > 0.5) {
        const list = this.measurements.get(this.image.key) || [];
        list.push(m);
        this.measurements.set(this.image.key, list);
        this.callbacks.onMeasure?.(this.lengthText(m));
      }
      this.draw();
    } else if (drag.tool === "window" && this.preview) {
      this.callbacks.onWindow?.(this.preview, true);
    }
  }
}
