// Reads UI message streams the way the AI SDK's own chat client does, and reports what it saw.
//
//   node check_stream.mjs <package: ai5 | ai6> <input.json>
//
// input.json: {"headers": {...}, "streams": {"<name>": "<the SSE response body>", ...}}.
// For each stream, prints (one JSON document on stdout, keyed by stream name):
//   chunks:  every SSE event parsed and validated with the package's uiMessageChunkSchema,
//            [{type, valid, error}] (the transport's own parseJsonEventStream does both);
//   errors:  what the client reported while reading the response through
//            DefaultChatTransport (the transport useChat uses, which throws on the first
//            chunk that fails the schema) and readUIMessageStream: {name, message};
//   message: the UI message readUIMessageStream rebuilt (its last snapshot).
// Both packages are npm aliases (tests/js/package.json): ai5 = ai@5.x, ai6 = ai@6.x.

import { readFileSync } from "node:fs";

const [pkg, inputPath] = process.argv.slice(2);
const ai = await import(pkg);
const input = JSON.parse(readFileSync(inputPath, "utf8"));

function body(text) {
  return new Response(text, { status: 200, headers: input.headers }).body;
}

async function validateChunks(text) {
  const chunks = [];
  const parsed = ai.parseJsonEventStream({ stream: body(text), schema: ai.uiMessageChunkSchema });
  for await (const result of parsed) {
    chunks.push({
      type: result.rawValue?.type ?? null,
      valid: result.success,
      error: result.success ? null : String(result.error?.message ?? result.error),
    });
  }
  return chunks;
}

async function readThroughTransport(text) {
  const errors = [];
  const transport = new ai.DefaultChatTransport({
    api: "http://vel.test/api/chat",
    fetch: async () => new Response(text, { status: 200, headers: input.headers }),
  });
  const stream = await transport.sendMessages({
    trigger: "submit-message",
    chatId: "chat-1",
    messageId: undefined,
    messages: [{ id: "u1", role: "user", parts: [{ type: "text", text: "hi" }] }],
    abortSignal: undefined,
  });
  let message = null;
  for await (const snapshot of ai.readUIMessageStream({
    stream,
    onError: (error) => errors.push({ name: error?.name ?? null, message: String(error?.message ?? error) }),
  })) {
    message = snapshot;
  }
  return { errors, message };
}

const report = {};
for (const [name, text] of Object.entries(input.streams)) {
  report[name] = { chunks: await validateChunks(text), ...(await readThroughTransport(text)) };
}
process.stdout.write(JSON.stringify(report));
