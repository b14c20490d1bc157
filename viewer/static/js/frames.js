// Rendered frames on their way to the screen: a bounded cache of decoded images
// and a small request queue, so the shown slice goes first and its neighbours are
// fetched next (prefetch) without flooding the server.

const MAX_ENTRIES = 400;
const CONCURRENCY = 4;

export class FrameCache {
  constructor(load) {
    this.load = load; // (request) -> Promise<ImageBitmap>
    this.entries = new Map(); // key -> Promise<ImageBitmap>, oldest first
    this.queue = [];
    this.running = 0;
  }

  static key(request) {
    const w = request.windowing ? `${request.windowing.center},${request.windowing.width}` : "-";
    return `${request.sop}/${request.frame}/${w}`;
  }

  has(request) {
    return this.entries.has(FrameCache.key(request));
  }

  // The image for request, now first in line.
  get(request) {
    const key = FrameCache.key(request);
    const known = this.entries.get(key);
    if (known) {
      this.entries.delete(key);
      this.entries.set(key, known);
      const index = this.queue.findIndex((job) => job.key === key);
      if (index >= 0) {
        const [job] = this.queue.splice(index, 1);
        job.urgent = true;
        this.queue.unshift(job);
      }
      return known;
    }
    return this.enqueue(key, request, true);
  }

  // Replace queued (not started) prefetches with these, nearest first.
  prefetch(requests) {
    const dropped = this.queue.filter((job) => !job.urgent);
    this.queue = this.queue.filter((job) => job.urgent);
    for (const job of dropped) {
      this.entries.delete(job.key);
      job.reject(new DOMException("dropped", "AbortError"));
    }
    for (const request of requests) {
      const key = FrameCache.key(request);
      if (!this.entries.has(key)) this.enqueue(key, request, false);
    }
  }

  enqueue(key, request, urgent) {
    let job;
    const promise = new Promise((resolve, reject) => {
      job = { key, request, urgent, resolve, reject };
    });
    // A failed or dropped request is forgotten, so the next get() asks again.
    promise.catch(() => {
      if (this.entries.get(key) === promise) this.entries.delete(key);
    });
    this.entries.set(key, promise);
    if (urgent) this.queue.unshift(job);
    else this.queue.push(job);
    this.trim();
    this.pump();
    return promise;
  }

  pump() {
    while (this.running < CONCURRENCY && this.queue.length) {
      const job = this.queue.shift();
      this.running += 1;
      this.load(job.request)
        .then(job.resolve, job.reject)
        .finally(() => {
          this.running -= 1;
          this.pump();
        });
    }
  }

  trim() {
    const queued = new Set(this.queue.map((job) => job.key));
    for (const key of this.entries.keys()) {
      if (this.entries.size <= MAX_ENTRIES) break;
      if (queued.has(key)) continue;
      this.entries.delete(key);
    }
  }

  clear() {
    for (const job of this.queue) {
      this.entries.delete(job.key);
      job.reject(new DOMException("dropped", "AbortError"));
    }
    this.queue = [];
  }
}
