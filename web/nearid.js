// NearID node pack: show each NearID node's key result (the `text` of its `ui` output: the score
// table, the filter decision, the loader status) on the node itself after a run.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const RESULT_WIDGET = "nearid_result";

function showResult(node, text) {
  let widget = node.widgets?.find((w) => w.name === RESULT_WIDGET);
  if (!widget) {
    const make = ComfyWidgets.MARKDOWN ?? ComfyWidgets.STRING;
    widget = make(node, RESULT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.options = { ...(widget.options ?? {}), serialize: false }; // never sent to the server
    widget.serialize = false; // nor saved in the workflow's widgets_values
    if (widget.inputEl) widget.inputEl.readOnly = true;
  }
  widget.value = text;
  if (widget.inputEl) widget.inputEl.value = text;
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]); // grow only
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "comfy-nearid.ResultOnNode",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith("NearID")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (Array.isArray(text) && text.length && text.join("")) showResult(this, text.join("\n\n"));
    };
  },
});
