// Drives an MCP server with the official TypeScript SDK (@modelcontextprotocol/sdk 1.x).
//
// usage: MCP_SDK=<path to the sdk package> node ts_client.mjs BASE_URL MODE   (MODE: http | sse)
//
// Prints `nodes=<replicas that answered>` and `OK` when the session completed; exits 1 otherwise.
const [base, mode] = process.argv.slice(2);
const sdk = process.env.MCP_SDK;
const { Client } = await import(`${sdk}/dist/esm/client/index.js`);
const { StreamableHTTPClientTransport } = await import(`${sdk}/dist/esm/client/streamableHttp.js`);
const { SSEClientTransport } = await import(`${sdk}/dist/esm/client/sse.js`);

// With MCP_BEARER set, every request carries the token (the SDK's requestInit headers; the
// SSE GET takes them through eventSourceInit's fetch).
const bearer = process.env.MCP_BEARER;
const headers = bearer ? { Authorization: `Bearer ${bearer}` } : {};
const requestInit = { headers };
const eventSourceInit = {
  fetch: (url, init) => fetch(url, { ...init, headers: { ...(init?.headers ?? {}), ...headers } }),
};
const transport = mode === "sse"
  ? new SSEClientTransport(new URL(`${base}/sse`), { requestInit, eventSourceInit })
  : new StreamableHTTPClientTransport(new URL(`${base}/mcp`), { requestInit });
const client = new Client({ name: "mcp-edge-ts-test", version: "1" });
try {
  await client.connect(transport);
  const tools = (await client.listTools()).tools.map((t) => t.name);
  for (const needed of ["hello", "echo", "calculator"]) {
    if (!tools.includes(needed)) throw new Error(`${needed} missing from tools/list: ${tools}`);
  }
  const nodes = new Set();
  for (let i = 0; i < 6; i++) {
    const r = await client.callTool({ name: "hello", arguments: { name: `ts${i}` } });
    const m = /\(from ([^)]+)\)/.exec(r.content[0].text);
    if (!m) throw new Error(`hello did not name its replica: ${r.content[0].text}`);
    nodes.add(m[1]);
  }
  const sum = await client.callTool({ name: "calculator", arguments: { operation: "add", a: 2, b: 3 } });
  if (!JSON.stringify(sum.content).includes("5")) throw new Error(`calculator: ${JSON.stringify(sum)}`);
  if (mode !== "sse") await transport.terminateSession();
  await client.close();
  console.log(`nodes=${[...nodes].sort().join(",")}`);
  console.log("OK");
} catch (e) {
  console.log(`FAILED: ${e?.stack ?? e}`);
  process.exit(1);
}
