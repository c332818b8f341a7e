// Inputs built from the server's own description of its parameters (`/metadata`: name, type, default, bounds,
// choices, the allowed values in words): nothing here knows a parameter by name. `read()` gives the values
// that differ from the defaults, which is what a request sends as its `params`.

function element(tag, attrs = {}, parent = undefined) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  if (parent) parent.append(node);
  return node;
}

function inputFor(field, id) {
  if (field.type === "boolean") return element("input", { type: "checkbox", id });
  if (field.type === "choice") {
    const select = element("select", { id });
    for (const choice of field.choices) element("option", { value: String(choice), text: String(choice) }, select);
    return select;
  }
  if (field.type === "integer" || field.type === "number") {
    return element("input", {
      type: "number", id, inputmode: field.type === "integer" ? "numeric" : "decimal",
      min: field.minimum ?? field.exclusiveMinimum, max: field.maximum ?? field.exclusiveMaximum,
      step: field.type === "integer" ? "1" : "any",
    });
  }
  return element("input", { type: "text", id, autocomplete: "off", spellcheck: "false",
                            placeholder: field.nullable ? "unset" : "" });
}

function show(value) {
  return value === null || value === undefined ? "" : String(value);
}

/** One labelled input per field in `container`; ids are `${prefix}-${name}`. */
export function buildForm(container, fields, prefix) {
  const inputs = [];
  for (const field of fields) {
    if (field.type === "object" || field.type === "triple") continue; // not a single input's worth
    const id = `${prefix}-${field.name}`;
    const row = element("div", { class: `field field-${field.type}` }, container);
    const label = element("label", { for: id, text: field.name }, row);
    const input = inputFor(field, id);
    input.dataset.name = field.name;
    const hint = element("small", { id: `${id}-hint`, text: [field.allowed, field.doc].filter(Boolean).join("; ") }, row);
    input.setAttribute("aria-describedby", hint.id);
    if (field.type === "boolean") label.prepend(input);
    else row.insertBefore(input, hint);
    inputs.push({ field, input });
  }

  function set({ field, input }, value) {
    if (field.type === "boolean") input.checked = Boolean(value);
    else input.value = show(value);
  }

  function value({ field, input }) {
    if (field.type === "boolean") return input.checked;
    const text = input.value.trim();
    if (text === "") return field.nullable ? null : undefined;
    if (field.type === "integer" || field.type === "number") return Number(text);
    if (field.type === "choice" && field.choices.every((c) => typeof c === "number")) return Number(text);
    return text;
  }

  const reset = () => inputs.forEach((item) => set(item, item.field.default));
  reset();
  return {
    reset,
    /** The values that differ from the defaults, by name; an Error naming each input the browser could
     *  not read as a number. */
    read() {
      const params = {};
      const bad = inputs.filter((item) => item.input.validity && item.input.validity.badInput);
      if (bad.length) throw new Error(bad.map((item) => `${item.field.name}: not a number`).join("\n"));
      for (const item of inputs) {
        const given = value(item);
        if (given === undefined || given === item.field.default) continue;
        params[item.field.name] = given;
      }
      return params;
    },
  };
}
