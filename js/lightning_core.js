// Pure logic behind the Lightning hints (no DOM, no ComfyUI imports), so it runs under `node --test`.
// It reads a LiteGraph-shaped graph: graph.getNodeById(id), graph.links (object or Map) with
// {origin_id, target_id, type}, nodes with {id, type, widgets: [{name, value}], outputs: [{links: [...]}]}.
//
// Every rule (the step-count file-name pattern, which step counts suit a module, the cfg limit, the sampler and
// schedulers) comes from `rules`: data the server sends with the loader's node schema (nodes/guards.py
// frontend_rules). Nothing here repeats a rule; tests/test_frontend_rules.py checks that.

export const LOADER = "ADL_LoadMotionModule";
export const APPLY = "ADL_ApplyMotionModule";
export const SAMPLER = "ADL_LightningSampler";
export const SIGMAS = "ADL_LightningSigmas";
export const KSAMPLER_TYPES = ["KSampler", "KSamplerAdvanced"];

// The rules the server put on the loader's `name` input, or null when that schema has none.
export function rulesFromNodeDef(nodeData) {
  const spec = nodeData?.input?.required?.name;
  const options = Array.isArray(spec) ? spec[1] : null;
  return options?.adl_rules ?? null;
}

export function widgetValue(node, name) {
  const w = (node.widgets || []).find((x) => x.name === name);
  return w ? w.value : undefined;
}

function baseName(filename) {
  return filename.split(/[\\/]/).pop();
}

// Step count in a release-style file name ("animatediff_lightning_4step_comfyui.safetensors" -> 4), else null.
export function stepsInFileName(filename, rules) {
  if (typeof filename !== "string") return null;
  const m = baseName(filename).match(new RegExp(rules.step_pattern, "i"));
  return m ? parseInt(m[1], 10) : null;
}

// {steps, origin} of a loader, the way the server decides it: the lightning_steps widget unless auto, else the
// file's metadata, else its name; null when nothing gives one.
export function moduleSteps(loader, rules) {
  const chosen = widgetValue(loader, "lightning_steps");
  if (chosen !== undefined && chosen !== rules.auto) return { steps: parseInt(chosen, 10), origin: "loader" };
  const name = widgetValue(loader, "name");
  const fromMetadata = rules.steps_in_metadata?.[name];
  if (fromMetadata) return { steps: fromMetadata, origin: "metadata" };
  const fromName = stepsInFileName(name, rules);
  return fromName === null ? null : { steps: fromName, origin: "file name" };
}

export function goodSteps(steps, rules) {
  return [steps, ...(rules.extra_good_steps?.[String(steps)] ?? [])];
}

export function notDownloaded(filename, rules) {
  return (rules.not_downloaded ?? []).includes(filename);
}

const ORIGIN_TEXT = { loader: "set by lightning_steps", metadata: "from the file's metadata", "file name": "from the file name" };

export function recommendation(loader, rules) {
  const found = moduleSteps(loader, rules);
  if (!found) return null;
  const { steps, origin } = found;
  const others = goodSteps(steps, rules).filter((n) => n !== steps);
  const alt = others.length ? ` (or ${others.join(", ")})` : "";
  return {
    steps,
    origin,
    text: `Lightning ${steps}-step, ${ORIGIN_TEXT[origin]}: steps ${steps}${alt}, cfg 1, ` +
      `${rules.sampler}/${rules.schedulers[0]}`,
  };
}

// The loader's own line: the recommendation, and whether its file still has to be downloaded.
export function loaderHint(loader, rules) {
  const rec = recommendation(loader, rules);
  const name = widgetValue(loader, "name");
  const parts = [];
  if (notDownloaded(name, rules)) parts.push("not downloaded yet: fetched from the hub on first run");
  if (rec) parts.push(rec.text);
  return parts.length ? parts.join(" · ") : null;
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

// Problems of one sampler given the module's step count (null: not a Lightning module); [] when all is well.
export function samplerProblems(sampler, moduleSteps, rules) {
  const problems = [];
  const steps = widgetValue(sampler, "steps");
  const ours = sampler.type === SAMPLER || sampler.type === SIGMAS;
  if (moduleSteps === null) {
    if (ours && steps === 0) problems.push("steps 0 needs a step count: set lightning_steps on the loader");
    return problems;
  }
  const good = goodSteps(moduleSteps, rules);
  if (typeof steps === "number" && !(ours && steps === 0) && !good.includes(steps)) {
    problems.push(`steps ${steps} != module's ${moduleSteps}${ours ? " (0 = auto)" : ""}`);
  }
  const cfg = widgetValue(sampler, "cfg");
  if (typeof cfg === "number" && cfg > rules.cfg_warn_above) {
    problems.push(`cfg ${cfg}: Lightning wants 1 (at most ${rules.cfg_warn_above})`);
  }
  if (KSAMPLER_TYPES.includes(sampler.type)) {
    const scheduler = widgetValue(sampler, "scheduler");
    if (scheduler !== undefined && !rules.schedulers.includes(scheduler)) {
      problems.push(`scheduler ${scheduler}: use ${rules.schedulers[0]}`);
    }
    const name = widgetValue(sampler, "sampler_name");
    if (name !== undefined && name !== rules.sampler) problems.push(`sampler ${name}: use ${rules.sampler}`);
  }
  return problems;
}

// For every loader: {loader, hint, rec, flagged: [{node, problems}]}.
export function analyse(graph, nodes, rules) {
  const report = [];
  if (!rules) return report;
  for (const loader of nodes) {
    if (loader.type !== LOADER) continue;
    const rec = recommendation(loader, rules);
    const flagged = [];
    for (const n of downstream(graph, loader)) {
      const problems = samplerProblems(n, rec ? rec.steps : null, rules);
      if (problems.length) flagged.push({ node: n, problems });
    }
    report.push({ loader, rec, hint: loaderHint(loader, rules), flagged });
  }
  return report;
}
