// Shows the recommended settings on a Lightning motion-module loader and flags samplers downstream of it
// whose settings leave the distilled grid. The logic lives in lightning_core.js.
import { app } from "../../scripts/app.js";
import { analyse, LOADER, SAMPLER, SIGMAS, KSAMPLER_TYPES } from "./lightning_core.js";

const WATCHED = new Set([LOADER, SAMPLER, SIGMAS, ...KSAMPLER_TYPES]);
const WARN = "#d9534f";
const HINT = "#8fbc8f";

function refresh(graph) {
  if (!graph || !graph._nodes) return;
  for (const n of graph._nodes) {
    if (WATCHED.has(n.type)) {
      n.adlHint = null;
      n.adlProblems = null;
    }
  }
  for (const { loader, rec, flagged } of analyse(graph, graph._nodes)) {
    loader.adlHint = rec.text;
    for (const { node, problems } of flagged) {
      node.adlProblems = (node.adlProblems || []).concat(problems);
    }
  }
  for (const n of graph._nodes) {
    if (WATCHED.has(n.type)) reserveLine(n);
  }
  graph.setDirtyCanvas?.(true, true);
}

let pending = null;
function schedule() {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    refresh(app.graph);
  }, 50);
}

const LINE = 16; // px of room a node gets at its bottom for the line

function fitted(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText(t + "…").width > width) t = t.slice(0, -1);
  return t + "…";
}

function lineText(node) {
  return node.adlProblems?.length ? "⚠ " + node.adlProblems.join("; ") : node.adlHint;
}

// Give the node one line of room at its bottom while it has something to say, and take it back after.
function reserveLine(node) {
  const wanted = !!lineText(node);
  if (!!node.adlRoom === wanted || !node.size) return;
  node.adlRoom = wanted;
  node.setSize?.([node.size[0], node.size[1] + (wanted ? LINE : -LINE)]);
}

function drawLine(node, ctx, text, color) {
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = color;
  ctx.fillText(fitted(ctx, text, node.size[0] - 12), 6, node.size[1] - 5);
  ctx.restore();
}

app.registerExtension({
  name: "adlightning.lightningHints",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!WATCHED.has(nodeData.name)) return;
    const onDraw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDraw?.apply(this, arguments);
      if (this.flags?.collapsed) return r;
      const text = lineText(this);
      if (text) drawLine(this, ctx, text, this.adlProblems?.length ? WARN : HINT);
      return r;
    };
    // keep the room when the frontend recomputes the node's size (widget changes, resizes)
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize ? computeSize.apply(this, arguments) : [...this.size];
      if (this.adlRoom) size[1] += LINE;
      return size;
    };
    const onConn = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const r = onConn?.apply(this, arguments);
      schedule();
      return r;
    };
    const onCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onCreated?.apply(this, arguments);
      for (const w of this.widgets || []) {
        const cb = w.callback;
        w.callback = function () {
          const out = cb?.apply(this, arguments);
          schedule();
          return out;
        };
      }
      schedule();
      return r;
    };
  },
  async afterConfigureGraph() {
    schedule();
  },
});
