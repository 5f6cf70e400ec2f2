// One chat turn against a real server, sent and read by the AI SDK's own client.
//
//   node chat_client.mjs <package: ai5 | ai6> <api url> <bearer token> <chat id> <text>
//
// Posts the user's message with DefaultChatTransport (what useChat uses; it validates every
// chunk of the answer with uiMessageChunkSchema) and rebuilds the assistant's message with
// readUIMessageStream. Prints {message, errors} as JSON.

const [pkg, api, token, chatId, text] = process.argv.slice(2);
const ai = await import(pkg);

const errors = [];
const transport = new ai.DefaultChatTransport({
  api,
  headers: { authorization: `Bearer ${token}` },
});
const stream = await transport.sendMessages({
  trigger: "submit-message",
  chatId,
  messageId: undefined,
  messages: [{ id: `u-${Date.now()}`, role: "user", parts: [{ type: "text", text }] }],
  abortSignal: undefined,
});
let message = null;
for await (const snapshot of ai.readUIMessageStream({
  stream,
  onError: (error) => errors.push({ name: error?.name ?? null, message: String(error?.message ?? error) }),
})) {
  message = snapshot;
}
process.stdout.write(JSON.stringify({ message, errors }));
