"""Example workflows in ComfyUI's UI format: checking them against node schemas, and turning them into API prompts.

Schemas come from our node specs (``nodes.specs``) and, for ComfyUI core nodes, from ``tests/data/
comfyui_core_nodes.json`` (captured from a running ComfyUI's ``/object_info``), or from a live server's
``/object_info`` in the integration tests. A schema lists a node's inputs in ComfyUI's order with their types;
widget inputs (numbers, strings, booleans, combos) take their values from ``widgets_values`` in that order, and a
seed with ``control_after_generate`` is followed by one extra value ("fixed", "randomize", ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE_NODES = REPO / "tests" / "data" / "comfyui_core_nodes.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass(frozen=True)
class InputSchema:
    name: str
    type: str  # "COMBO" for option lists
    optional: bool
    widget: bool
    control_after_generate: bool = False


@dataclass(frozen=True)
class NodeSchema:
    node_type: str
    inputs: tuple[InputSchema, ...]
    outputs: tuple[str, ...]

    def input(self, name: str) -> InputSchema | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> list[InputSchema]:
        return [i for i in self.inputs if i.widget]


def schema_from_object_info(node_type: str, info: dict) -> NodeSchema:
    inputs = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items() if k != "hidden"}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            type_name = "COMBO" if isinstance(kind, list) else kind
            inputs.append(InputSchema(name, type_name, section == "optional", type_name in WIDGET_TYPES,
                                      bool(opts.get("control_after_generate"))))
    return NodeSchema(node_type, tuple(inputs), tuple(info["output"]))


def schema_from_spec(spec) -> NodeSchema:
    inputs = tuple(InputSchema(i.id, i.type, i.optional, i.type in WIDGET_TYPES, i.control_after_generate)
                   for i in spec.inputs)
    return NodeSchema(spec.node_id, inputs, tuple(o.type for o in spec.outputs))


def offline_schemas() -> dict[str, NodeSchema]:
    """Our nodes from their specs plus the core nodes recorded in tests/data (no ComfyUI needed)."""
    from nodes import specs, training_specs

    core = json.loads(CORE_NODES.read_text())
    schemas = {k: schema_from_object_info(k, v) for k, v in core.items() if not k.startswith("_")}
    schemas.update({s.node_id: schema_from_spec(s) for s in specs.all_specs() + training_specs.TRAINING_NODES})
    return schemas


def live_schemas(object_info: dict) -> dict[str, NodeSchema]:
    return {k: schema_from_object_info(k, v) for k, v in object_info.items()}


def _types_match(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def _widget_values(node: dict, schema: NodeSchema) -> dict:
    """Map a UI node's ``widgets_values`` onto widget input names; socket-converted widgets keep their slot."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return dict(values)
    values = list(values or [])
    named, i = {}, 0
    for widget in schema.widgets:
        if i >= len(values):
            break
        named[widget.name] = values[i]
        i += 2 if widget.control_after_generate else 1
    named["__count__"] = len(values)
    named["__expected__"] = sum(2 if w.control_after_generate else 1 for w in schema.widgets)
    return named


def validate(workflow: dict, schemas: dict[str, NodeSchema]) -> list[str]:
    """Problems in a UI-format workflow: unknown node types or inputs, links between mismatched types, links
    that point nowhere, widget value counts that do not fit the node, required inputs left unconnected."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = {l[0]: l for l in workflow.get("links", [])}
    for node in nodes.values():
        kind = node.get("type")
        where = f"node {node['id']} ({kind})"
        schema = schemas.get(kind)
        if schema is None:
            if kind not in ("Note", "MarkdownNote", "Reroute"):
                problems.append(f"{where}: unknown node type")
            continue
        for inp in node.get("inputs", []):
            s = schema.input(inp["name"])
            if s is None:
                problems.append(f"{where}: no input named {inp['name']!r}")
                continue
            if inp.get("widget") is not None and inp["widget"] != {"name": inp["name"]}:
                problems.append(f"{where}: input {inp['name']!r} names widget {inp['widget']}")
            if inp.get("link") is None:
                continue
            if s.widget and inp.get("widget") is None:
                problems.append(f"{where}: input {inp['name']!r} is a widget; a link into it must be stored with "
                                f"\"widget\": {{\"name\": \"{inp['name']}\"}}, as the frontend does")
            link = links.get(inp["link"])
            if link is None:
                problems.append(f"{where}: input {inp['name']!r} refers to missing link {inp['link']}")
                continue
            _, origin, origin_slot, target, _, link_type = link
            origin_node = nodes.get(origin)
            if target != node["id"] or origin_node is None:
                problems.append(f"{where}: link {link[0]} does not connect {origin} to this node")
                continue
            origin_schema = schemas.get(origin_node["type"])
            if origin_schema is not None:
                if origin_slot >= len(origin_schema.outputs):
                    problems.append(f"{where}: link {link[0]} starts at missing output {origin_slot} of "
                                    f"{origin_node['type']}")
                    continue
                out_type = origin_schema.outputs[origin_slot]
                if not _types_match(out_type, s.type):
                    problems.append(f"{where}: input {inp['name']!r} ({s.type}) fed {out_type} from "
                                    f"{origin_node['type']}")
                if not _types_match(link_type, out_type):
                    problems.append(f"{where}: link {link[0]} is typed {link_type} but carries {out_type}")
        connected = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        named = _widget_values(node, schema)
        if "__count__" in named and named["__count__"] != named["__expected__"]:
            problems.append(f"{where}: {named['__count__']} widget values for {named['__expected__']} widget slots")
        for s in schema.inputs:
            if not s.optional and not s.widget and s.name not in connected:
                problems.append(f"{where}: required input {s.name!r} is not connected")
    for link in links.values():
        if link[1] not in nodes or link[3] not in nodes:
            problems.append(f"link {link[0]} connects missing nodes {link[1]} -> {link[3]}")
    return problems


def to_api(workflow: dict, schemas: dict[str, NodeSchema], overrides: dict | None = None) -> dict:
    """The API prompt ComfyUI's frontend would queue for this workflow. ``overrides`` maps
    ``(node_id, input_name)`` or ``(node_type, input_name)`` to a value."""
    overrides = overrides or {}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt = {}
    for node in nodes.values():
        if node.get("mode", 0) != 0 or node["type"] in ("Note", "MarkdownNote"):
            continue
        schema = schemas[node["type"]]
        inputs = {k: v for k, v in _widget_values(node, schema).items() if not k.startswith("__")}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        for (key, name), value in overrides.items():
            if key in (node["id"], node["type"]) and schema.input(name) is not None:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
