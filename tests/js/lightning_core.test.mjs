import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import {
  stepsInFileName, moduleSteps, recommendation, loaderHint, downstream, samplerProblems, analyse, rulesFromNodeDef,
} from "../../js/lightning_core.js";

// What nodes/guards.py frontend_rules() sends with the loader's schema (tests/test_frontend_rules.py keeps this
// file equal to it).
const RULES = JSON.parse(readFileSync(new URL("./rules.json", import.meta.url), "utf8"));

function graph(nodes, links, asMap = false) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const table = asMap ? new Map(links.map((l) => [l.id, l])) : Object.fromEntries(links.map((l) => [l.id, l]));
  return { links: table, getNodeById: (id) => byId.get(id) ?? null, _nodes: nodes };
}

function node(id, type, widgets = {}, outputs = []) {
  return { id, type, widgets: Object.entries(widgets).map(([name, value]) => ({ name, value })), outputs };
}

function loader(name, lightningSteps = "auto") {
  return node(1, "ADL_LoadMotionModule", { name, group_norm: "per_frame", lightning_steps: lightningSteps },
    [{ type: "MOTION_MODULE", links: [10] }]);
}

test("rules come from the loader's schema", () => {
  const nodeData = { name: "ADL_LoadMotionModule", input: { required: { name: [["a.safetensors"], { adl_rules: RULES }] } } };
  assert.deepEqual(rulesFromNodeDef(nodeData), RULES);
  assert.equal(rulesFromNodeDef({ input: { required: {} } }), null);
});

test("step count: the lightning_steps widget, else metadata, else the file name", () => {
  assert.equal(stepsInFileName("animatediff_lightning_4step_comfyui.safetensors", RULES), 4);
  assert.equal(stepsInFileName("sub/dir/animatediff_lightning_8step_diffusers.safetensors", RULES), 8);
  assert.equal(stepsInFileName("AnimateDiff-Lightning-2step.safetensors", RULES), 2);
  assert.equal(stepsInFileName("my-lightning_4steps.safetensors", RULES), 4); // "steps" as the server reads it
  assert.equal(stepsInFileName("mm_sd_v15_v2.ckpt", RULES), null);
  assert.equal(stepsInFileName(undefined, RULES), null);
  assert.deepEqual(moduleSteps(loader("animatediff_lightning_4step_comfyui.safetensors"), RULES),
    { steps: 4, origin: "file name" });
  assert.deepEqual(moduleSteps(loader("my_renamed_module.safetensors"), RULES), { steps: 4, origin: "metadata" });
  assert.deepEqual(moduleSteps(loader("renamed.safetensors", "2"), RULES), { steps: 2, origin: "loader" });
  assert.deepEqual(moduleSteps(loader("animatediff_lightning_4step_comfyui.safetensors", "8"), RULES),
    { steps: 8, origin: "loader" });
  assert.equal(moduleSteps(loader("mm_sd_v15_v2.ckpt"), RULES), null);
  assert.equal(recommendation(loader("mm_sd_v15_v2.ckpt"), RULES), null);
  const rec = recommendation(loader("animatediff_lightning_2step_comfyui.safetensors"), RULES);
  assert.equal(rec.steps, 2);
  assert.match(rec.text, /from the file name: steps 2 \(or 3\), cfg 1, euler\/sgm_uniform/);
  assert.match(recommendation(loader("x.safetensors", "4"), RULES).text, /set by lightning_steps/);
});

test("a released module that is not on disk is marked on the loader", () => {
  assert.match(loaderHint(loader("animatediff_lightning_8step_comfyui.safetensors"), RULES),
    /^not downloaded yet: .* · Lightning 8-step/);
  assert.doesNotMatch(loaderHint(loader("animatediff_lightning_4step_comfyui.safetensors"), RULES), /not downloaded/);
});

function lightningGraph(samplerSteps, asMap = false, extra = {}) {
  const mm = loader(extra.name ?? "animatediff_lightning_4step_comfyui.safetensors", extra.lightningSteps ?? "auto");
  const apply = node(2, "ADL_ApplyMotionModule", {}, [{ type: "MODEL", links: [11, 13] }]);
  const lora = node(3, "LoraLoaderModelOnly", {}, [{ type: "MODEL", links: [12] }]);
  const sampler = node(4, "ADL_LightningSampler", { steps: samplerSteps, cfg: extra.cfg ?? 1.0 },
    [{ type: "LATENT", links: [14] }]);
  const ks = node(5, "KSampler", { steps: 4, cfg: extra.ksCfg ?? 1.0, scheduler: extra.scheduler ?? "sgm_uniform",
    sampler_name: "euler" }, [{ type: "LATENT", links: [] }]);
  const decode = node(6, "VAEDecode", {}, [{ type: "IMAGE", links: [] }]);
  const links = [
    { id: 10, origin_id: 1, target_id: 2, type: "MOTION_MODULE" },
    { id: 11, origin_id: 2, target_id: 3, type: "MODEL" },
    { id: 12, origin_id: 3, target_id: 4, type: "MODEL" },
    { id: 13, origin_id: 2, target_id: 5, type: "MODEL" },
    { id: 14, origin_id: 4, target_id: 6, type: "LATENT" },
  ];
  return graph([mm, apply, lora, sampler, ks, decode], links, asMap);
}

test("samplers are found through apply and other MODEL nodes", () => {
  for (const asMap of [false, true]) {
    const g = lightningGraph(0, asMap);
    const ids = downstream(g, g.getNodeById(1)).map((n) => n.id).sort();
    assert.deepEqual(ids, [2, 3, 4, 5]); // LATENT wires (sampler -> decode) are not followed
  }
});

test("a Lightning sampler whose steps disagree is flagged; 0 and the module's count are fine", () => {
  assert.deepEqual(analyse(lightningGraph(0), lightningGraph(0)._nodes, RULES)[0].flagged, []);
  assert.deepEqual(analyse(lightningGraph(4), lightningGraph(4)._nodes, RULES)[0].flagged, []);
  const g = lightningGraph(8);
  const [report] = analyse(g, g._nodes, RULES);
  assert.equal(report.rec.steps, 4);
  assert.equal(report.flagged.length, 1);
  assert.equal(report.flagged[0].node.id, 4);
  assert.match(report.flagged[0].problems[0], /steps 8/);
});

test("KSampler with an off-grid scheduler is flagged", () => {
  const g = lightningGraph(0, false, { scheduler: "karras" });
  const [report] = analyse(g, g._nodes, RULES);
  assert.deepEqual(report.flagged.map((f) => f.node.id), [5]);
  assert.match(report.flagged[0].problems.join(" "), /karras/);
});

test("cfg above the limit is flagged on both samplers; 1.5-2 is fine", () => {
  let g = lightningGraph(0, false, { cfg: 2.0, ksCfg: 1.5 });
  assert.deepEqual(analyse(g, g._nodes, RULES)[0].flagged, []);
  g = lightningGraph(0, false, { cfg: 8.0, ksCfg: 7.5 });
  const flagged = analyse(g, g._nodes, RULES)[0].flagged;
  assert.deepEqual(flagged.map((f) => f.node.id).sort(), [4, 5]);
  assert.match(flagged.find((f) => f.node.id === 4).problems.join(" "), /cfg 8: Lightning wants 1/);
});

test("a renamed module with lightning_steps set behaves like the release name", () => {
  let g = lightningGraph(0, false, { name: "renamed.safetensors" });
  let [report] = analyse(g, g._nodes, RULES);
  assert.equal(report.rec, null);
  assert.match(report.flagged.find((f) => f.node.id === 4).problems[0], /set lightning_steps on the loader/);
  g = lightningGraph(0, false, { name: "renamed.safetensors", lightningSteps: "4" });
  [report] = analyse(g, g._nodes, RULES);
  assert.equal(report.rec.steps, 4);
  assert.deepEqual(report.flagged, []);
});

test("3 steps on the 2-step module is allowed", () => {
  const s = node(1, "ADL_LightningSampler", { steps: 3 });
  assert.deepEqual(samplerProblems(s, 2, RULES), []);
  assert.equal(samplerProblems(s, 4, RULES).length, 1);
});

test("non-Lightning loaders give no hint and flag nothing but steps 0", () => {
  const g = lightningGraph(4);
  g.getNodeById(1).widgets[0].value = "mm_sd_v15_v2.ckpt";
  const [report] = analyse(g, g._nodes, RULES);
  assert.equal(report.hint, null);
  assert.deepEqual(report.flagged, []);
});
