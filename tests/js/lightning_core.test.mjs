import test from "node:test";
import assert from "node:assert/strict";
import { lightningSteps, recommendation, downstream, samplerProblems, analyse } from "../../js/lightning_core.js";

function graph(nodes, links, asMap = false) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const table = asMap ? new Map(links.map((l) => [l.id, l])) : Object.fromEntries(links.map((l) => [l.id, l]));
  return { links: table, getNodeById: (id) => byId.get(id) ?? null, _nodes: nodes };
}

function node(id, type, widgets = {}, outputs = []) {
  return { id, type, widgets: Object.entries(widgets).map(([name, value]) => ({ name, value })), outputs };
}

test("step count comes from released Lightning file names only", () => {
  assert.equal(lightningSteps("animatediff_lightning_4step_comfyui.safetensors"), 4);
  assert.equal(lightningSteps("sub/dir/animatediff_lightning_8step_diffusers.safetensors"), 8);
  assert.equal(lightningSteps("AnimateDiff-Lightning-2step.safetensors"), 2);
  assert.equal(lightningSteps("mm_sd_v15_v2.ckpt"), null);
  assert.equal(lightningSteps(undefined), null);
  assert.equal(recommendation("mm_sd_v15_v2.ckpt"), null);
  const rec = recommendation("animatediff_lightning_2step_comfyui.safetensors");
  assert.equal(rec.steps, 2);
  assert.equal(rec.cfg, 1.0);
  assert.match(rec.text, /steps 2 \(or 3\), cfg 1\.0/);
});

function lightningGraph(samplerSteps, asMap = false, extra = {}) {
  const loader = node(1, "ADL_LoadMotionModule", { name: "animatediff_lightning_4step_comfyui.safetensors" },
    [{ type: "MOTION_MODULE", links: [10] }]);
  const apply = node(2, "ADL_ApplyMotionModule", {}, [{ type: "MODEL", links: [11, 13] }]);
  const lora = node(3, "LoraLoaderModelOnly", {}, [{ type: "MODEL", links: [12] }]);
  const sampler = node(4, "ADL_LightningSampler", { steps: samplerSteps, cfg: 1.0 }, [{ type: "LATENT", links: [14] }]);
  const ks = node(5, "KSampler", { steps: 4, scheduler: extra.scheduler ?? "sgm_uniform", sampler_name: "euler" },
    [{ type: "LATENT", links: [] }]);
  const decode = node(6, "VAEDecode", {}, [{ type: "IMAGE", links: [] }]);
  const links = [
    { id: 10, origin_id: 1, target_id: 2, type: "MOTION_MODULE" },
    { id: 11, origin_id: 2, target_id: 3, type: "MODEL" },
    { id: 12, origin_id: 3, target_id: 4, type: "MODEL" },
    { id: 13, origin_id: 2, target_id: 5, type: "MODEL" },
    { id: 14, origin_id: 4, target_id: 6, type: "LATENT" },
  ];
  return graph([loader, apply, lora, sampler, ks, decode], links, asMap);
}

test("samplers are found through apply and other MODEL nodes", () => {
  for (const asMap of [false, true]) {
    const g = lightningGraph(0, asMap);
    const ids = downstream(g, g.getNodeById(1)).map((n) => n.id).sort();
    assert.deepEqual(ids, [2, 3, 4, 5]); // LATENT wires (sampler -> decode) are not followed
  }
});

test("a Lightning sampler whose steps disagree is flagged; 0 and the module's count are fine", () => {
  assert.deepEqual(analyse(lightningGraph(0), lightningGraph(0)._nodes)[0].flagged, []);
  assert.deepEqual(analyse(lightningGraph(4), lightningGraph(4)._nodes)[0].flagged, []);
  const g = lightningGraph(8);
  const [report] = analyse(g, g._nodes);
  assert.equal(report.rec.steps, 4);
  assert.equal(report.flagged.length, 1);
  assert.equal(report.flagged[0].node.id, 4);
  assert.match(report.flagged[0].problems[0], /steps 8/);
});

test("KSampler with an off-grid scheduler is flagged", () => {
  const g = lightningGraph(0, false, { scheduler: "karras" });
  const [report] = analyse(g, g._nodes);
  assert.deepEqual(report.flagged.map((f) => f.node.id), [5]);
  assert.match(report.flagged[0].problems.join(" "), /karras/);
});

test("3 steps on the 2-step module is allowed", () => {
  const s = node(1, "ADL_LightningSampler", { steps: 3 });
  assert.deepEqual(samplerProblems(s, 2), []);
  assert.equal(samplerProblems(s, 4).length, 1);
});

test("non-Lightning loaders produce no report", () => {
  const g = lightningGraph(8);
  g.getNodeById(1).widgets[0].value = "mm_sd_v15_v2.ckpt";
  assert.deepEqual(analyse(g, g._nodes), []);
});
