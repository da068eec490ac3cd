// Compile contracts/*.sol with the pinned solc into build/<Name>.json (abi, bytecode, source hash).
// Usage: node compile.js [OUT_DIR]
const fs = require("fs");
const path = require("path");
const crypto = require("crypto");
const solc = require("solc");

const here = __dirname;
const out = path.resolve(process.argv[2] || path.join(here, "..", "deltaml", "artifacts"));
const sources = {};
// The escrow, and under test/ the contracts only the test suite deploys.
for (const dir of ["", "test"]) {
  for (const f of fs.readdirSync(path.join(here, dir)).filter((f) => f.endsWith(".sol")).sort()) {
    const name = path.join(dir, f);
    sources[name] = { content: fs.readFileSync(path.join(here, name), "utf8") };
  }
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    viaIR: true,
    evmVersion: "shanghai",
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};
const result = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (result.errors || []).filter((e) => e.severity === "error");
for (const e of result.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(1);
fs.mkdirSync(out, { recursive: true });
for (const [file, contracts] of Object.entries(result.contracts)) {
  const sha = crypto.createHash("sha256").update(sources[file].content).digest("hex");
  for (const [name, c] of Object.entries(contracts)) {
    if (!c.evm.bytecode.object) continue; // interfaces
    const artefact = {
      contract: name,
      source: file,
      source_sha256: sha,
      compiler: solc.version(),
      settings: input.settings,
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployed_bytecode: "0x" + c.evm.deployedBytecode.object,
    };
    fs.writeFileSync(path.join(out, name + ".json"), JSON.stringify(artefact, null, 1) + "\n");
    console.log(`${name}: ${c.evm.deployedBytecode.object.length / 2} bytes -> ${path.relative(process.cwd(), out)}`);
  }
}
