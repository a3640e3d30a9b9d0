// Shows the recommended settings on a Lightning motion-module loader, flags samplers downstream of it whose
// settings leave the distilled grid, marks released modules that are not downloaded yet in the loader's list,
// and shows the server's run-time warnings (toast + a line on the node). The logic lives in lightning_core.js;
// the rules come with the loader's node schema.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { analyse, rulesFromNodeDef, LOADER, SAMPLER, SIGMAS, KSAMPLER_TYPES } from "./lightning_core.js";

const WATCHED = new Set([LOADER, SAMPLER, SIGMAS, ...KSAMPLER_TYPES]);
const WARN = "#d9534f";
const HINT = "#8fbc8f";
const TOAST_LIFE_MS = 12000;

let rules = null;

function refresh(graph) {
  if (!graph || !graph._nodes) return;
  for (const n of graph._nodes) {
    if (WATCHED.has(n.type)) {
      n.adlHint = null;
      n.adlProblems = null;
    }
  }
  for (const { loader, hint, flagged } of analyse(graph, graph._nodes, rules)) {
    loader.adlHint = hint;
    for (const { node, problems } of flagged) {
      node.adlProblems = (node.adlProblems || []).concat(problems);
    }
  }
  for (const n of graph._nodes) {
    if (WATCHED.has(n.type) || n.adlRuntime) reserveLine(n);
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

function warnings(node) {
  return [...(node.adlRuntime || []), ...(node.adlProblems || [])];
}

function lineText(node) {
  const w = warnings(node);
  return w.length ? "⚠ " + w.join("; ") : node.adlHint;
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

// Draw our line on any node type (run-time warnings may land on nodes of other packs, e.g. KSampler).
function decorate(nodeType) {
  if (nodeType.prototype.adlDecorated) return;
  nodeType.prototype.adlDecorated = true;
  const onDraw = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    const r = onDraw?.apply(this, arguments);
    if (this.flags?.collapsed) return r;
    const text = lineText(this);
    if (text) drawLine(this, ctx, text, warnings(this).length ? WARN : HINT);
    return r;
  };
  // keep the room when the frontend recomputes the node's size (widget changes, resizes)
  const computeSize = nodeType.prototype.computeSize;
  nodeType.prototype.computeSize = function () {
    const size = computeSize ? computeSize.apply(this, arguments) : [...this.size];
    if (this.adlRoom) size[1] += LINE;
    return size;
  };
}

// Released modules not on disk keep their file name as the value; the list shows them with a mark after it.
// Only the loader's list holds these file names while they are not on disk, so the entries themselves say which
// menu this is (the canvas does not always say which node opened it).
function markNotDownloaded(menu) {
  if (!rules?.not_downloaded?.length) return;
  const missing = new Set(rules.not_downloaded);
  for (const entry of menu.root?.querySelectorAll(".litemenu-entry") ?? []) {
    const value = entry.dataset?.value ?? entry.textContent;
    if (missing.has(value) || missing.has(entry.textContent)) {
      entry.classList.add("adl-not-downloaded");
      entry.title = "Not downloaded yet: fetched from the Hugging Face hub (about 909 MB) the first time it runs";
    }
  }
}

function installMenuMarks() {
  const style = document.createElement("style");
  style.textContent = ".litemenu-entry.adl-not-downloaded::after { content: '  ⤓ not downloaded'; opacity: 0.6; " +
    "font-size: 0.85em; }";
  document.head.appendChild(style);
  const Menu = LiteGraph.ContextMenu;
  LiteGraph.ContextMenu = function (values, options) {
    const menu = new Menu(values, options);
    try {
      markNotDownloaded(menu);
    } catch (e) {
      console.warn("[AnimateDiff-Lightning] could not mark the motion-module list", e);
    }
    return menu;
  };
  LiteGraph.ContextMenu.prototype = Menu.prototype;
}

function showWarning(detail) {
  const message = detail?.message;
  if (!message) return;
  app.extensionManager?.toast?.add({ severity: "warn", summary: "AnimateDiff-Lightning", detail: message,
    life: TOAST_LIFE_MS });
  const node = detail.node != null ? app.graph?.getNodeById?.(detail.node) : null;
  if (node) {
    node.adlRuntime = [...(node.adlRuntime || []), message.replace(/^\[AnimateDiff-Lightning\]\s*/, "")];
    reserveLine(node);
    app.graph.setDirtyCanvas?.(true, true);
  }
}

function clearRuntime() {
  for (const n of app.graph?._nodes ?? []) {
    if (n.adlRuntime) {
      n.adlRuntime = null;
      reserveLine(n);
    }
  }
  app.graph?.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "adlightning.lightningHints",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === LOADER) rules = rulesFromNodeDef(nodeData) ?? rules;
    decorate(nodeType);
    if (!WATCHED.has(nodeData.name)) return;
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
  async refreshComboInNodes(defs) {
    // the Refresh command re-reads the schemas: files downloaded since then lose their mark
    if (defs?.[LOADER]) rules = rulesFromNodeDef(defs[LOADER]) ?? rules;
    schedule();
  },
  async setup() {
    installMenuMarks();
    if (rules?.warning_event) api.addEventListener(rules.warning_event, (e) => showWarning(e.detail));
    api.addEventListener("execution_start", clearRuntime);
  },
  async afterConfigureGraph() {
    schedule();
  },
});
