// Video Combine: show only the inputs the chosen format has.
//
// The node declares every format's inputs (crf, pix_fmt, lossless, quality, ...), so saved
// widgets_values keep their order and every prompt carries a value for each of them. This extension
// only hides the ones the chosen format lacks; hidden widgets keep their values and are still sent
// (the encoder ignores them). Which format has which input, and the values it accepts, come from the
// node definition itself (the format input's `slipstream_format_widgets` option, built from the
// Python format table), so the frontend and the encoder cannot disagree.

import { app } from "../../../scripts/app.js";

const NODE_TYPE = "SlipstreamVideoCombine";
const TABLE_KEY = "slipstream_format_widgets";
const STATE = Symbol("slipstreamFormatWidgets");

function widgetNamed(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// A widget whose input socket has a link is driven from outside; hiding it would hide the link too.
function isLinked(node, name) {
  return node.inputs?.some((input) => input.widget?.name === name && input.link != null) ?? false;
}

function accepts(rule, value) {
  if (Array.isArray(rule.values)) return rule.values.includes(value);
  if (typeof rule.max === "number") return value === rule.default || (value >= rule.min && value <= rule.max);
  return true;
}

function setShown(node, widget, shown) {
  const hide = !shown && !isLinked(node, widget.name);
  widget.hidden = hide;                 // the canvas renderer reads this
  widget.options = widget.options ?? {};
  widget.options.hidden = hide;         // the Vue node renderer reads this
}

// Limit a constrained widget to what the format accepts. On a user's format change a value the new
// format refuses is set aside and the widget goes to its default (auto / -1), so the run does not fail;
// switching to a format that accepts the set-aside value brings it back. On load nothing is changed.
function fitValue(state, widget, rule, changing) {
  if (widget.name === "pix_fmt") widget.options.values = rule?.values ?? state.pixFmts;
  if (widget.name === "crf") widget.options.max = rule?.max ?? state.crfMax;
  if (!changing || !rule || rule.default === undefined) return;
  const kept = state.kept.get(widget.name);
  if (!accepts(rule, widget.value)) {
    if (kept === undefined) state.kept.set(widget.name, widget.value);
    widget.value = rule.default;
  } else if (kept !== undefined && widget.value === rule.default && accepts(rule, kept)) {
    widget.value = kept;
    state.kept.delete(widget.name);
  }
}

// changing: the user picked another format (values may be set aside). fit: resize the node by what
// appeared or vanished; otherwise (a loaded node) keep its saved size unless that is now too small.
function applyFormat(node, table, { changing, fit = changing }) {
  const state = node[STATE];
  const format = widgetNamed(node, "format")?.value;
  // A format this table does not know, or one that arrives through a link (its value is not known
  // here): show everything.
  const has = isLinked(node, "format") ? undefined : table.formats[format];
  const before = node.computeSize()[1];
  for (const name of table.widgets) {
    const widget = widgetNamed(node, name);
    if (!widget) continue;
    const rule = has ? has[name] : {};
    setShown(node, widget, rule !== undefined);
    fitValue(state, widget, rule, changing);
  }
  const after = node.computeSize()[1];
  // Resizing by the difference keeps any room a preview took below the inputs.
  const height = fit ? Math.max(after, node.size[1] + after - before) : Math.max(after, node.size[1]);
  node.setSize([node.size[0], height]);
  node.setDirtyCanvas?.(true, true);
}

function chainCallback(widget, after) {
  const original = widget.callback;
  widget.callback = function (...args) {
    const result = original?.apply(this, args);
    after();
    return result;
  };
}

function setUp(node, table) {
  const pixFmt = widgetNamed(node, "pix_fmt");
  const crf = widgetNamed(node, "crf");
  node[STATE] = {
    kept: new Map(),
    pixFmts: Array.isArray(pixFmt?.options?.values) ? [...pixFmt.options.values] : undefined,
    crfMax: crf?.options?.max,
  };
  const format = widgetNamed(node, "format");
  if (!format) return;
  chainCallback(format, () => applyFormat(node, table, { changing: true }));
  // A value the user picks by hand replaces one set aside by a format change.
  for (const widget of [pixFmt, crf]) {
    if (widget) chainCallback(widget, () => node[STATE].kept.delete(widget.name));
  }
  // A new node was sized with every input shown; a loaded one gets its saved size right after this.
  applyFormat(node, table, { changing: false, fit: true });
}

app.registerExtension({
  name: "Slipstream.VideoCombineFormatWidgets",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const table = nodeData.input?.required?.format?.[1]?.[TABLE_KEY];
    if (!table?.formats || !Array.isArray(table.widgets)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      setUp(this, table);
      return result;
    };
    // Loading a workflow (or paste, undo) sets widget values without their callbacks: apply the loaded format.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      if (this[STATE]) applyFormat(this, table, { changing: false });
      return result;
    };
    // Connecting or removing a link on a widget's socket changes whether it may be hidden.
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (...args) {
      const result = onConnectionsChange?.apply(this, args);
      if (this[STATE]) applyFormat(this, table, { changing: false });
      return result;
    };
  },
});
