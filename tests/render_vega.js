// Render every vega / vega-lite spec of a `dvc plots show` page to SVG with the libraries inlined in the
// page itself (no network, no browser): proves the page's charts draw offline. Prints one JSON line.
//   node tests/render_vega.js dvc_plots/index.html
"use strict";
const fs = require("fs");
const vm = require("vm");

async function main(path) {
  const html = fs.readFileSync(path, "utf8");
  const scripts = [...html.matchAll(/<script type="text\/javascript">\n([\s\S]*?)\n    <\/script>/g)].map(m => m[1]);
  const sandbox = { console, setTimeout, clearTimeout };
  sandbox.self = sandbox; sandbox.globalThis = sandbox;  // no `window`: vega then binds no DOM events
  vm.createContext(sandbox);
  for (const code of scripts) {
    if (code.includes("vegaEmbed('#")) continue;  // a plot's own call, not a library
    vm.runInContext(code, sandbox);
  }
  if (!sandbox.vega || !sandbox.vegaLite) throw new Error("the page does not define vega and vegaLite");
  const specs = [...html.matchAll(/var spec = ([\s\S]*?);\n\s*vegaEmbed\('#/g)].map(m => JSON.parse(m[1]));
  const rendered = [];
  for (const spec of specs) {
    const vgSpec = String(spec.$schema || "").includes("vega-lite") ? sandbox.vegaLite.compile(spec).spec : spec;
    const view = new sandbox.vega.View(sandbox.vega.parse(vgSpec), { renderer: "none" });
    const svg = await view.toSVG();
    const marks = (svg.match(/<path|<line|<circle|<rect/g) || []).length;
    rendered.push({ title: JSON.stringify(spec.title || ""), svg_bytes: svg.length, marks });
  }
  const external = [...html.matchAll(/<script[^>]+src="(https?:[^"]+)"/g)].map(m => m[1]);
  console.log(JSON.stringify({ libraries: ["vega", "vegaLite", "vegaEmbed"].filter(n => sandbox[n]),
                               specs: specs.length, rendered, external_scripts: external }));
}

main(process.argv[2]).catch(err => { console.error(String(err && err.stack || err)); process.exit(1); });
