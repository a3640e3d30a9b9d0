// Live training curves on the Distill Stage node: loss (MSE, or D and G), discriminator accuracy and
// preference, drawn from the "adl.training" websocket messages the node sends every iteration and, after a
// page reload, from the run folder's log (GET /adlightning/training/log).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "ADL_DistillStage";
const EVENT = "adl.training";
const PANELS = [
  { title: "loss", keys: ["mse", "d", "g"], fixed: null },
  { title: "D accuracy", keys: ["accuracy"], fixed: [0, 1] },
  { title: "D preference", keys: ["preference"], fixed: [0, 1] },
];
const COLOURS = { mse: "#5aaaff", d: "#ff785a", g: "#78dc78", accuracy: "#ffc850", preference: "#c88cff" };
const HEIGHT = 240;

function iterationRecords(records) {
  return (records || []).filter((r) => !r.event && typeof r.iteration === "number");
}

export function drawCurves(canvas, state) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.fillStyle = "#18181c";
  ctx.fillRect(0, 0, w, h);
  const rows = iterationRecords(state.records);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ddd";
  const status = state.run
    ? `${state.run}  ${rows.length ? rows[rows.length - 1].iteration : 0}${state.total ? "/" + state.total : ""}` +
      (state.status ? `  ${state.status}` : "")
    : "no run yet";
  ctx.fillText(status, 6, 12);
  if (!rows.length) return;
  const xs = rows.map((r) => r.iteration);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const top0 = 18, panelH = (h - top0) / PANELS.length;
  PANELS.forEach((panel, p) => {
    const top = top0 + p * panelH + 12, bottom = top0 + (p + 1) * panelH - 4, left = 40, right = w - 6;
    const keys = panel.keys.filter((k) => rows.some((r) => Number.isFinite(r[k])));
    ctx.strokeStyle = "#505058";
    ctx.strokeRect(left, top, right - left, bottom - top);
    ctx.fillStyle = "#ccc";
    ctx.fillText(`${panel.title} ${keys.join(" ")}`, left, top - 2);
    if (!keys.length) return;
    let lo, hi;
    if (panel.fixed) {
      [lo, hi] = panel.fixed;
      ctx.strokeStyle = "#3a3a44";
      const mid = bottom - (bottom - top) * 0.5;
      ctx.beginPath(); ctx.moveTo(left, mid); ctx.lineTo(right, mid); ctx.stroke();
    } else {
      const values = rows.flatMap((r) => keys.map((k) => r[k]).filter(Number.isFinite));
      lo = Math.min(...values); hi = Math.max(...values);
      if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
    }
    ctx.fillStyle = "#999";
    ctx.fillText(hi.toPrecision(3), 2, top + 9);
    ctx.fillText(lo.toPrecision(3), 2, bottom);
    for (const k of keys) {
      ctx.strokeStyle = ctx.fillStyle = COLOURS[k];
      ctx.lineWidth = 2;
      ctx.beginPath();
      let first = true;
      for (const r of rows) {
        if (!Number.isFinite(r[k])) continue;
        const x = left + ((right - left) * (r.iteration - x0)) / (x1 - x0);
        const y = bottom - ((bottom - top) * (r[k] - lo)) / (hi - lo);
        if (first) { ctx.moveTo(x, y); first = false; } else ctx.lineTo(x, y);
      }
      ctx.stroke();
      for (const r of rows) {
        if (!Number.isFinite(r[k])) continue;
        const x = left + ((right - left) * (r.iteration - x0)) / (x1 - x0);
        const y = bottom - ((bottom - top) * (r[k] - lo)) / (hi - lo);
        ctx.fillRect(x - 2, y - 2, 4, 4);
      }
    }
  });
}

function widgetValue(node, name) {
  const w = (node.widgets || []).find((x) => x.name === name);
  return w ? w.value : undefined;
}

function ensureWidget(node) {
  if (node.adlTraining) return node.adlTraining;
  const canvas = document.createElement("canvas");
  canvas.width = 420;
  canvas.height = HEIGHT;
  canvas.style.width = "100%";
  canvas.style.height = `${HEIGHT}px`;
  canvas.className = "adl-training-curves";
  const state = { canvas, records: [], run: null, total: 0, status: "" };
  node.adlTraining = state;
  if (node.addDOMWidget) {
    node.addDOMWidget("training_curves", "adl_curves", canvas, { serialize: false, getHeight: () => HEIGHT });
  }
  const redraw = () => {
    const width = Math.max(200, Math.round(canvas.clientWidth || node.size?.[0] || 420));
    if (canvas.width !== width) canvas.width = width;
    drawCurves(canvas, state);
  };
  state.redraw = redraw;
  new ResizeObserver(redraw).observe(canvas);
  redraw();
  return state;
}

async function restore(node) {
  const state = ensureWidget(node);
  const name = widgetValue(node, "run_name");
  const resume = widgetValue(node, "resume");
  const query = resume && resume !== "new" && resume !== "latest"
    ? `run=${encodeURIComponent(resume)}` : `run_name=${encodeURIComponent(name || "")}`;
  try {
    const response = await api.fetchApi(`/adlightning/training/log?${query}`);
    if (!response.ok) return;
    const payload = await response.json();
    if (payload.run && !state.live) {
      state.run = payload.run;
      state.records = payload.records || [];
      state.status = "from the run's log";
      state.redraw();
    }
  } catch (error) {
    console.warn("[AnimateDiff-Lightning] training log:", error);
  }
}

function onMessage(event) {
  const data = event.detail || {};
  const node = app.graph?.getNodeById?.(Number(data.node));
  if (!node || node.type !== NODE) return;
  const state = ensureWidget(node);
  state.live = true;
  if (data.run !== state.run) {
    state.run = data.run;
    state.records = [];
  }
  if (data.event === "start") {
    state.records = (data.records || []).slice();
    state.total = data.total || 0;
    state.status = "running";
  } else if (data.event === "iteration") {
    state.total = data.total || state.total;
    state.records = state.records.filter((r) => r.event || r.iteration !== data.record.iteration);
    state.records.push(data.record);
    state.status = `running, ${data.record.seconds?.toFixed?.(1) ?? "?"} s/it`;
  } else if (data.event === "cancelled") {
    state.status = `cancelled: state saved at iteration ${data.record.iteration}`;
  } else if (data.event === "failed") {
    state.status = "failed (see the error)";
  } else if (data.event === "done") {
    state.status = `done: ${data.record.student}`;
  } else if (data.event === "validation") {
    state.status = `validation at iteration ${data.record.iteration}`;
  }
  state.redraw();
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "adlightning.training",
  setup() {
    api.addEventListener(EVENT, onMessage);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      ensureWidget(this);
      return result;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = configured?.apply(this, arguments);
      setTimeout(() => restore(this), 0);
      return result;
    };
  },
});
