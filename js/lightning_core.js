// Pure logic behind the Lightning hints (no DOM, no ComfyUI imports), so it runs under `node --test`.
// It reads a LiteGraph-shaped graph: graph.getNodeById(id), graph.links (object or Map) with
// {origin_id, target_id, type}, nodes with {id, type, widgets: [{name, value}], outputs: [{links: [...]}]}.

export const LOADER = "ADL_LoadMotionModule";
export const APPLY = "ADL_ApplyMotionModule";
export const SAMPLER = "ADL_LightningSampler";
export const SIGMAS = "ADL_LightningSigmas";
export const KSAMPLER_TYPES = ["KSampler", "KSamplerAdvanced"];
const GOOD_SCHEDULERS = ["sgm_uniform", "simple"];

// "animatediff_lightning_4step_comfyui.safetensors" -> 4; anything else -> null
export function lightningSteps(filename) {
  if (typeof filename !== "string") return null;
  const base = filename.split(/[\\/]/).pop();
  const m = base.match(/lightning[_-]?(\d+)[_-]?step/i);
  return m ? parseInt(m[1], 10) : null;
}

export function recommendation(filename) {
  const steps = lightningSteps(filename);
  if (steps === null) return null;
  const note = steps === 1 ? " (research only)" : steps === 2 ? " (or 3)" : "";
  return { steps, cfg: 1.0, text: `Lightning ${steps}-step: steps ${steps}${note}, cfg 1.0, euler/sgm_uniform` };
}

export function widgetValue(node, name) {
  const w = (node.widgets || []).find((x) => x.name === name);
  return w ? w.value : undefined;
}

function link(graph, id) {
  const links = graph.links;
  if (!links || id === null || id === undefined) return null;
  return typeof links.get === "function" ? links.get(id) : links[id];
}

// Nodes fed (directly or through MODEL-passing nodes) by `node`'s outputs.
export function downstream(graph, node, maxDepth = 16) {
  const found = [];
  const seen = new Set([node.id]);
  let frontier = [node];
  for (let depth = 0; depth < maxDepth && frontier.length; depth++) {
    const next = [];
    for (const n of frontier) {
      for (const out of n.outputs || []) {
        for (const id of out.links || []) {
          const l = link(graph, id);
          if (!l) continue;
          const target = graph.getNodeById(l.target_id);
          if (!target || seen.has(target.id)) continue;
          seen.add(target.id);
          found.push(target);
          // keep following MODEL wires (LoRA loaders, context windows, ...) but not LATENT/IMAGE etc.
          if (target.type === APPLY || (target.outputs || []).some((o) => o.type === "MODEL")) next.push(target);
        }
      }
    }
    frontier = next;
  }
  return found;
}

// Problems of one sampler given the module's step count; [] when all is well.
export function samplerProblems(sampler, moduleSteps) {
  const problems = [];
  const steps = widgetValue(sampler, "steps");
  if (sampler.type === SAMPLER || sampler.type === SIGMAS) {
    if (typeof steps === "number" && steps !== 0 && steps !== moduleSteps && !(moduleSteps === 2 && steps === 3)) {
      problems.push(`steps ${steps} != module's ${moduleSteps} (0 = auto)`);
    }
  } else if (KSAMPLER_TYPES.includes(sampler.type)) {
    if (typeof steps === "number" && steps !== moduleSteps && !(moduleSteps === 2 && steps === 3)) {
      problems.push(`steps ${steps} != module's ${moduleSteps}`);
    }
    const scheduler = widgetValue(sampler, "scheduler");
    if (scheduler !== undefined && !GOOD_SCHEDULERS.includes(scheduler)) {
      problems.push(`scheduler ${scheduler}: use sgm_uniform`);
    }
    const name = widgetValue(sampler, "sampler_name");
    if (name !== undefined && name !== "euler") problems.push(`sampler ${name}: use euler`);
  }
  return problems;
}

// For every loader holding a Lightning module: {loader, rec, flagged: [{node, problems}]}.
export function analyse(graph, nodes) {
  const report = [];
  for (const loader of nodes) {
    if (loader.type !== LOADER) continue;
    const rec = recommendation(widgetValue(loader, "name"));
    if (!rec) continue;
    const flagged = [];
    for (const n of downstream(graph, loader)) {
      const problems = samplerProblems(n, rec.steps);
      if (problems.length) flagged.push({ node: n, problems });
    }
    report.push({ loader, rec, flagged });
  }
  return report;
}
