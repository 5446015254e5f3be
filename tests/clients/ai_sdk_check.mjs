#!/usr/bin/env node
// Drive an OpenAI-compatible server with the Vercel AI SDK (`ai` 6 and
// `@ai-sdk/openai-compatible` 2, the provider OpenCode uses for custom servers).
//
// Usage: node tests/clients/ai_sdk_check.mjs BASE_URL
//   BASE_URL is the server root (e.g. http://127.0.0.1:8080); "/v1" is appended.
//   TOFY_API_KEY: bearer token to send (default "none").
// Prints "ok" and exits 0, or prints what failed and exits 1.

import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { generateText, streamText } from 'ai';

const base = process.argv[2];
if (!base || process.argv.length !== 3) {
  console.error('usage: node tests/clients/ai_sdk_check.mjs BASE_URL');
  process.exit(2);
}

const provider = createOpenAICompatible({
  name: 'tofy',
  baseURL: base.replace(/\/+$/, '') + '/v1',
  apiKey: process.env.TOFY_API_KEY ?? 'none',
  // Sends stream_options: {include_usage: true}; without it a stream carries
  // no usage. OpenCode turns this on for every openai-compatible provider.
  includeUsage: true,
});
const model = provider('tofy');

let step = 'setup';
function check(cond, msg) {
  if (!cond) throw new Error(`[${step}] ${msg}`);
}

const FINISH = ['stop', 'length'];

function checkUsage(usage) {
  check(usage != null, 'usage missing');
  check(usage.inputTokens > 0, `usage.inputTokens=${usage.inputTokens}`);
  check(usage.outputTokens > 0 && usage.outputTokens <= 16,
    `usage.outputTokens=${usage.outputTokens} not in 1..=16`);
}

async function main() {
  step = 'generateText';
  const g = await generateText({
    model,
    prompt: 'Say hello in one short sentence.',
    maxOutputTokens: 16,
    temperature: 0,
    maxRetries: 0,
  });
  check(g.text.trim() !== '', `empty text: ${JSON.stringify(g.text)}`);
  check(FINISH.includes(g.finishReason), `finishReason=${g.finishReason}`);
  checkUsage(g.usage);

  step = 'streamText';
  let streamError;
  const s = streamText({
    model,
    prompt: 'Name three colours.',
    maxOutputTokens: 16,
    temperature: 0,
    maxRetries: 0,
    onError: ({ error }) => { streamError = error; },
  });
  let text = '';
  let deltas = 0;
  for await (const delta of s.textStream) {
    text += delta;
    deltas += 1;
  }
  check(streamError === undefined, `stream error: ${streamError}`);
  check(text.trim() !== '', `empty streamed text (${deltas} deltas)`);
  check(deltas >= 2, `only ${deltas} text deltas; expected token-by-token streaming`);
  const finishReason = await s.finishReason;
  check(FINISH.includes(finishReason), `finishReason=${finishReason}`);
  checkUsage(await s.usage);
  check((await s.text) === text, 'result.text differs from the concatenated textStream');
}

try {
  await main();
  console.log('ok');
  process.exit(0);
} catch (e) {
  const msg = e?.message ?? String(e);
  console.error(msg.startsWith('[') ? `FAIL ${msg}` : `FAIL [${step}] ${e?.name ?? 'Error'}: ${msg}`);
  if (e?.responseBody) console.error(`response body: ${String(e.responseBody).slice(0, 500)}`);
  process.exit(1);
}
