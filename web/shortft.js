// ShortFT for ComfyUI - frontend extension: a live reward chart (and loss) on every ShortFTTrain node, with the
// progressive stages marked, held-out evaluations, and the latest preview image of the run.
//
// Data: the node's `shortft.progress` websocket events (nodes/train.py: kinds phase, step, eval, end) while it
// trains, and GET /shortft/live (nodes/live.py) whenever a graph is loaded or the socket reconnects, so a page
// reloaded in the middle of a run draws everything trained so far. A node shows the run of its own id whose run
// name equals its run_name widget (the run folder output/shortft/<run_name> the chart describes).
//
// The widget's root element keeps what it shows in data attributes (data-points, data-evals, data-status,
// data-phase, data-iteration, data-stage, data-drawn-points, data-preview), for tests and for users' own styles.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawChart, evalNames, summarize } from "./shortft/chart.js";

const EXTENSION = "ShortFT.LiveChart";
const NODE_TYPE = "ShortFT_Train";
const EVENT = "shortft.progress";
const WIDGET = "shortft_live_chart";
const LIVE_ROUTE = "/shortft/live";
const MIN_HEIGHT = 330;
const MAX_HEIGHT = 440; // a taller node gives the rest to the image ComfyUI shows under the widgets

/** node id -> run state (the server's LIVE entry, kept up to date by the events). */
const runs = new Map();
/** node id -> {url, iteration} of the latest preview image. */
const previews = new Map();
/** Every chart widget on the page. */
const views = new Set();

const STYLE = `
.shortft-live { display: flex; flex-direction: column; gap: 3px; box-sizing: border-box; width: 100%; height: 100%;
  padding: 4px 6px; font: 11px sans-serif; color: #c8c8c8; background: rgba(0, 0, 0, 0.25); border-radius: 6px;
  overflow: hidden; }
.shortft-live .shortft-head { display: flex; justify-content: space-between; gap: 6px; white-space: nowrap; }
.shortft-live .shortft-title { overflow: hidden; text-overflow: ellipsis; font-weight: 600; }
.shortft-live .shortft-status { flex: none; }
.shortft-live[data-status="running"] .shortft-status { color: #7cc4ff; }
.shortft-live[data-status="finished"] .shortft-status { color: #8fd18f; }
.shortft-live[data-status="stopped"] .shortft-status,
.shortft-live[data-status="failed"] .shortft-status { color: #e06c75; }
.shortft-live .shortft-sub { color: #9a9a9a; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.shortft-live canvas { flex: 1 1 auto; min-height: 0; width: 100%; }
.shortft-live .shortft-foot { display: flex; gap: 8px; align-items: center; min-height: 64px; }
.shortft-live .shortft-preview { width: 64px; height: 64px; flex: none; object-fit: contain; image-rendering: pixelated;
  background: #111; border-radius: 4px; }
.shortft-live .shortft-preview:not([src]) { visibility: hidden; }
.shortft-live .shortft-legend { line-height: 1.35; color: #b0b0b0; overflow: hidden; }
.shortft-live .shortft-key { display: inline-block; width: 10px; height: 3px; margin: 0 3px 2px 0;
  vertical-align: middle; }
`;

function addStyle() {
  if (document.getElementById("shortft-live-style")) return;
  const style = document.createElement("style");
  style.id = "shortft-live-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

function escape(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function fmt(v, digits = 3) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "-";
}

// ----- run states --------------------------------------------------------------------------------------------

function freshState(id, detail) {
  return {
    node: id, run: detail.run, prompt_id: detail.prompt_id ?? null, iterations: detail.iterations ?? 0,
    reward_name: detail.reward_name ?? null, method: detail.method ?? null, status: "running", phase: "",
    points: [], evals: [], previews: 0,
  };
}

/** The state of node `id` for an event: a new one when the event belongs to another prompt (a new run). */
function stateForEvent(id, detail) {
  let st = runs.get(id);
  if (!st || (detail.prompt_id && st.prompt_id && st.prompt_id !== detail.prompt_id) || st.run !== detail.run) {
    st = freshState(id, detail);
    runs.set(id, st);
    previews.delete(id);
  }
  if (detail.iterations) st.iterations = detail.iterations;
  if (detail.reward_name) st.reward_name = detail.reward_name;
  if (detail.method) st.method = detail.method;
  return st;
}

function addPoint(points, p) {
  const last = points[points.length - 1];
  if (!last || last.iteration < p.iteration) {
    points.push(p);
    return;
  }
  const i = points.findIndex((q) => q.iteration >= p.iteration);
  if (points[i].iteration === p.iteration) points[i] = p;
  else points.splice(i, 0, p);
}

function addEval(evals, e) {
  if (!evals.some((f) => f.iteration === e.iteration && f.seconds === e.seconds)) {
    evals.push(e);
    evals.sort((a, b) => a.iteration - b.iteration || a.seconds - b.seconds);
  }
}

function onProgress({ detail }) {
  if (!detail || detail.node == null) return;
  const id = String(detail.node);
  const st = stateForEvent(id, detail);
  switch (detail.kind) {
    case "phase":
      st.phase = detail.phase;
      st.status = "running";
      break;
    case "step":
      st.phase = "train";
      addPoint(st.points, {
        iteration: detail.iteration, reward: detail.reward, loss: detail.loss, stage: detail.stage,
        seconds: detail.seconds,
      });
      break;
    case "eval":
      if (detail.eval) addEval(st.evals, detail.eval);
      break;
    case "end":
      st.status = detail.status;
      st.phase = "";
      break;
  }
  renderNode(id);
}

function onPreview({ detail }) {
  const id = String(detail?.displayNodeId ?? detail?.nodeId ?? "");
  if (!runs.has(id) || !detail.blob) return;
  const old = previews.get(id);
  if (old?.own) URL.revokeObjectURL(old.url);
  const st = runs.get(id);
  previews.set(id, { url: URL.createObjectURL(detail.blob), iteration: st.points.at(-1)?.iteration ?? 0, own: true });
  renderNode(id);
}

/** Merge the server's state of every node (after a reload, a reconnect or a graph load). */
async function refreshLive() {
  let answer;
  try {
    const response = await api.fetchApi(LIVE_ROUTE, { cache: "no-store" });
    if (!response.ok) return;
    answer = await response.json();
  } catch (error) {
    console.warn("[ShortFT] could not read the live training state", error);
    return;
  }
  for (const [id, entry] of Object.entries(answer.nodes ?? {})) {
    const st = runs.get(id);
    if (!st || st.run !== entry.run || (entry.prompt_id && st.prompt_id !== entry.prompt_id)) {
      runs.set(id, { ...entry, node: id, points: [...entry.points], evals: [...entry.evals] });
    } else {
      for (const p of entry.points) addPoint(st.points, p);
      for (const e of entry.evals) addEval(st.evals, e);
      if (st.status === "running") st.status = entry.status;
      st.reward_name ??= entry.reward_name;
      st.method ??= entry.method;
      st.previews = entry.previews;
    }
    if (entry.previews > 0 && !previews.get(id)?.own) {
      previews.set(id, {
        url: api.apiURL(`${LIVE_ROUTE}/preview?node=${encodeURIComponent(id)}&n=${entry.previews}`),
        iteration: entry.preview_iteration ?? 0, own: false,
      });
    }
  }
  for (const view of views) view.render();
}

function renderNode(id) {
  for (const view of views) if (String(view.node.id) === id) view.schedule();
}

// ----- the widget --------------------------------------------------------------------------------------------

class LiveChart {
  constructor(node) {
    this.node = node;
    this.draws = 0;
    this.pending = false;
    const root = (this.root = document.createElement("div"));
    root.className = "shortft-live";
    root.dataset.nodeId = String(node.id);
    root.innerHTML = `
      <div class="shortft-head"><span class="shortft-title"></span><span class="shortft-status"></span></div>
      <div class="shortft-sub"></div>
      <canvas></canvas>
      <div class="shortft-foot"><img class="shortft-preview" alt="latest preview">
        <div class="shortft-legend"></div></div>`;
    this.title = root.querySelector(".shortft-title");
    this.status = root.querySelector(".shortft-status");
    this.sub = root.querySelector(".shortft-sub");
    this.canvas = root.querySelector("canvas");
    this.preview = root.querySelector(".shortft-preview");
    this.legend = root.querySelector(".shortft-legend");
    this.widget = node.addDOMWidget(WIDGET, "shortft-chart", root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => MIN_HEIGHT,
      getMaxHeight: () => MAX_HEIGHT,
      getValue: () => "",
      setValue: () => {},
    });
    this.widget.serialize = false; // not a setting: no place in widgets_values nor in the API prompt
    this.observer = new ResizeObserver(() => this.schedule());
    this.observer.observe(this.canvas);
    const runName = node.widgets?.find((w) => w.name === "run_name");
    if (runName) {
      const callback = runName.callback;
      runName.callback = (...args) => {
        const r = callback?.apply(runName, args);
        this.schedule();
        return r;
      };
    }
    const onRemoved = node.onRemoved;
    node.onRemoved = (...args) => {
      this.observer.disconnect();
      views.delete(this);
      return onRemoved?.apply(node, args);
    };
    views.add(this);
    this.render();
  }

  /** The run this node shows: its id's run when the run name matches its run_name widget. */
  state() {
    const st = runs.get(String(this.node.id));
    return st && st.run === widgetValue(this.node, "run_name") ? st : null;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  render() {
    const st = this.state();
    const root = this.root;
    const empty = { iterations: widgetValue(this.node, "iterations") ?? 0, points: [], evals: [] };
    const s = summarize(st ?? empty);
    root.dataset.nodeId = String(this.node.id);
    root.dataset.points = String(s.points.length);
    root.dataset.evals = String(s.evals.length);
    root.dataset.status = st?.status ?? "idle";
    root.dataset.phase = st?.phase ?? "";
    root.dataset.iteration = String(s.last?.iteration ?? 0);
    root.dataset.firstIteration = String(s.points[0]?.iteration ?? "");
    root.dataset.stage = String(s.last?.stage ?? "");
    root.dataset.run = st?.run ?? "";

    if (st) {
      this.title.textContent = `${st.run}${st.method ? " · " + st.method : ""}`;
      this.status.textContent = st.status === "running" ? (st.phase ? `running: ${st.phase}` : "running") : st.status;
      const parts = [`iteration ${s.last?.iteration ?? 0}/${s.xmax}`];
      if (s.last?.stage != null) parts.push(`stage ${s.last.stage}`);
      if (s.last) parts.push(`reward ${fmt(s.last.reward)}`);
      if (s.perIteration) parts.push(`${s.perIteration.toFixed(2)} s/it`);
      this.sub.textContent = parts.join(" · ");
    } else {
      this.title.textContent = widgetValue(this.node, "run_name") ?? "";
      this.status.textContent = "idle";
      this.sub.textContent = "queue the graph: reward, loss, stages and held-out evaluations are drawn live";
    }
    this.legend.innerHTML = this.legendHtml(st, s);

    const preview = st ? previews.get(String(this.node.id)) : null;
    if (preview) {
      if (this.preview.getAttribute("src") !== preview.url) this.preview.src = preview.url;
      this.preview.title = `preview at iteration ${preview.iteration}`;
      root.dataset.preview = String(preview.iteration);
    } else {
      this.preview.removeAttribute("src");
      delete root.dataset.preview;
    }

    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    if (w < 20 || h < 20) return;
    const ratio = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(w * ratio) || this.canvas.height !== Math.round(h * ratio)) {
      this.canvas.width = Math.round(w * ratio);
      this.canvas.height = Math.round(h * ratio);
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const drawn = drawChart(ctx, w, h, st ?? empty);
    this.draws += 1;
    root.dataset.drawnPoints = String(drawn.points.length);
    root.dataset.drawnEvals = String(drawn.evals.length);
    root.dataset.drawnStages = String(drawn.stages.length);
    root.dataset.draws = String(this.draws);
  }

  legendHtml(st, s) {
    const key = (color) => `<span class="shortft-key" style="background:${color}"></span>`;
    const lines = [
      `${key("#4aa3ff")}reward (mean of ${Math.max(1, Math.round(s.points.length / 15))}) ${key("#e06c75")}loss`,
    ];
    if (st && st.evals.length) {
      const e = st.evals[st.evals.length - 1];
      const values = evalNames(st).map((n) => `${escape(n)} ${fmt(e[n])}${e[n + "_std"] ? " ± " + fmt(e[n + "_std"]) : ""}`);
      lines.push(`${key("#ffb347")}held-out at iteration ${e.iteration}: ${values.join(", ")}`);
      if (st.evals.length > 1 && s.evalName) {
        const first = st.evals[0][s.evalName];
        lines.push(`${escape(s.evalName)}: ${fmt(first)} → ${fmt(e[s.evalName])} (${st.evals.length} evaluations)`);
      }
    } else {
      lines.push(`${key("#ffb347")}held-out evaluations (eval_every)`);
    }
    return lines.map((l) => `<div>${l}</div>`).join("");
  }
}

// ----- registration ------------------------------------------------------------------------------------------

// ComfyUI serves this folder under the project name and the folder name; when they differ the module loads twice.
if (!app.extensions?.some?.((e) => e.name === EXTENSION)) {
  app.registerExtension({
    name: EXTENSION,
    async setup() {
      addStyle();
      api.addEventListener(EVENT, onProgress);
      api.addEventListener("b_preview_with_metadata", onPreview);
      api.addEventListener("reconnected", refreshLive);
      await refreshLive();
    },
    nodeCreated(node) {
      if (node.comfyClass === NODE_TYPE) {
        addStyle();
        node.shortftChart = new LiveChart(node);
      }
    },
    async afterConfigureGraph() {
      await refreshLive();
    },
  });
}
