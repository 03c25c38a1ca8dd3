// A small line chart in SVG: one polyline per series over a window of seconds, a y axis with
// round ticks, an x axis in minutes before now, a legend, and a title and description for
// screen readers (the description says in words what the lines show). Drawn at the size of its
// container, again when that changes.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

// The step between y ticks: the smallest whole "round" number (1, 2, 2.5 or 5 times a power of
// ten) that fits `ticks` steps over `top`.
function tickStep(top, ticks) {
  const raw = top / ticks;
  if (!(raw > 1)) return 1;
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const step of [1, 2, 2.5, 5, 10]) {
    const candidate = step * power;
    if (candidate >= raw && Number.isInteger(candidate)) return candidate;
  }
  return 10 * power;
}

const COMPACT = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
function compact(value) {
  return value < 1000 ? String(value) : COMPACT.format(value);
}

function rate(value) {
  return value >= 10 ? value.toFixed(0) : value >= 1 ? value.toFixed(1) : value.toFixed(2);
}

export class LineChart {
  // series: [{key, label, className}]; the values given to update() are {key: [numbers]}.
  constructor(container, { title, series, windowSeconds, unit = "per second" }) {
    this.container = container;
    this.series = series;
    this.windowSeconds = windowSeconds;
    this.unit = unit;
    this.values = null;
    const id = container.id || "chart";
    this.svg = svg("svg", { role: "img", "aria-labelledby": `${id}-title ${id}-desc`, class: "chart" });
    this.title = svg("title", { id: `${id}-title` }, title);
    this.desc = svg("desc", { id: `${id}-desc` }, "No figures yet.");
    this.plot = svg("g");
    this.svg.append(this.title, this.desc, this.plot);
    this.legend = document.createElement("ul");
    this.legend.className = "legend";
    this.legendValues = new Map();
    for (const s of series) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = `swatch ${s.className}`;
      swatch.setAttribute("aria-hidden", "true");
      const value = document.createElement("span");
      value.className = "legend-value";
      value.textContent = "–";
      item.append(swatch, `${s.label}: `, value);
      this.legend.append(item);
      this.legendValues.set(s.key, value);
    }
    container.append(this.svg, this.legend);
    this.width = 0;
    if (typeof ResizeObserver === "function") {
      new ResizeObserver(() => this.resize()).observe(container);
    }
    this.resize();
  }

  resize() {
    const width = Math.max(240, Math.floor(this.container.clientWidth || 600));
    if (width === this.width) return;
    this.width = width;
    this.draw();
  }

  update(values) {
    this.values = values;
    this.draw();
    this.describe();
  }

  describe() {
    const parts = [];
    for (const s of this.series) {
      const data = this.values[s.key] || [];
      const now = data.length ? data[data.length - 1] : 0; // the last complete second
      const lastMinute = data.slice(-60);
      const average = lastMinute.length ? lastMinute.reduce((a, b) => a + b, 0) / lastMinute.length : 0;
      const peak = data.length ? Math.max(...data) : 0;
      this.legendValues.get(s.key).textContent = `${now} in the last second, ${rate(average)}/s over the last minute`;
      parts.push(`${s.label}: ${now} in the last second, ${rate(average)} ${this.unit} on average over the last minute, peak ${peak}`);
    }
    this.desc.textContent = `The last ${Math.round(this.windowSeconds / 60)} minutes. ${parts.join("; ")}.`;
  }

  draw() {
    const width = this.width;
    const height = width < 500 ? 180 : 240;
    const margin = { top: 12, right: 12, bottom: 28, left: 48 };
    const plotWidth = width - margin.left - margin.right;
    const plotHeight = height - margin.top - margin.bottom;
    this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.svg.setAttribute("width", String(width));
    this.svg.setAttribute("height", String(height));
    this.plot.replaceChildren();

    const values = this.values || {};
    let top = 0;
    for (const s of this.series) for (const v of values[s.key] || []) top = Math.max(top, v);
    const ticks = 4;
    const max = tickStep(top, ticks) * ticks;
    const y = (v) => margin.top + plotHeight - (v / max) * plotHeight;
    const n = this.windowSeconds;
    const x = (i) => margin.left + (i / (n - 1)) * plotWidth;

    const grid = svg("g", { class: "grid", "aria-hidden": "true" });
    for (let t = 0; t <= ticks; t += 1) {
      const value = (max * t) / ticks;
      const yy = y(value);
      grid.append(svg("line", { x1: margin.left, x2: margin.left + plotWidth, y1: yy, y2: yy }));
      grid.append(svg("text", { x: margin.left - 6, y: yy + 4, "text-anchor": "end", class: "tick" }, compact(value)));
    }
    const minutes = Math.round(n / 60);
    const marks = [];
    for (let m = minutes; m >= 0; m -= 1) marks.push(m);
    // Narrow: the first, the middle and now only.
    const shown = width < 500 ? [...new Set([minutes, Math.round(minutes / 2), 0])] : marks;
    for (const m of shown) {
      const xx = x(n - 1 - m * 60);
      grid.append(svg("line", { x1: xx, x2: xx, y1: margin.top + plotHeight, y2: margin.top + plotHeight + 4 }));
      const label = m === 0 ? "now" : `−${m} min`;
      const anchor = m === minutes ? "start" : m === 0 ? "end" : "middle";
      grid.append(svg("text", { x: xx, y: height - 8, "text-anchor": anchor, class: "tick" }, label));
    }
    this.plot.append(grid);

    for (const s of this.series) {
      const data = values[s.key] || [];
      if (!data.length) continue;
      const offset = n - data.length;
      const points = data.map((v, i) => `${x(i + offset).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      this.plot.append(svg("polyline", { points, class: `line ${s.className}`, "aria-hidden": "true" }));
    }
  }
}
