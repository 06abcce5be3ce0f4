// The official OpenAI SDK as a client of a running Tollgate (echo model).
// Run by tests/e2e/openai_sdk_test.cpp with TOLLGATE_BASE_URL, TOLLGATE_KEY
// and TOLLGATE_LIMITED_KEY (a key allowed one request per minute).
import assert from 'node:assert/strict';
import OpenAI from 'openai';

import { runChecks } from './run_checks.mjs';

const baseURL = process.env.TOLLGATE_BASE_URL;
// No retries: a retried 429 or 5xx would hide the error under test.
const client = new OpenAI({ baseURL, apiKey: process.env.TOLLGATE_KEY, maxRetries: 0, timeout: 20000 });

async function expectError(type, status, call) {
  try {
    await call();
  } catch (e) {
    assert.ok(e instanceof type, `expected ${type.name}, got ${e?.constructor?.name}: ${e?.message}`);
    assert.equal(e.status, status);
    return e;
  }
  assert.fail(`expected ${type.name}, the call succeeded`);
}

const checks = {
  async chat() {
    const r = await client.chat.completions.create({
      model: 'echo',
      messages: [{ role: 'user', content: 'hello from the sdk' }],
    });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices[0].message.content, 'hello from the sdk');
    assert.equal(r.choices[0].finish_reason, 'stop');
    assert.equal(r.usage.prompt_tokens, 4);
    assert.equal(r.usage.completion_tokens, 4);
  },

  async chatStream() {
    const stream = await client.chat.completions.create({
      model: 'echo',
      messages: [{ role: 'user', content: 'one two three' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let usage = null;
    let finish = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices) {
        text += c.delta?.content ?? '';
        finish = c.finish_reason ?? finish;
      }
    }
    assert.equal(text, 'one two three');
    assert.equal(finish, 'stop');
    assert.equal(usage?.completion_tokens, 3);
  },

  async completions() {
    const r = await client.completions.create({ model: 'echo', prompt: 'a b c d', max_tokens: 2 });
    assert.equal(r.object, 'text_completion');
    assert.equal(r.choices[0].text, 'a b');
    assert.equal(r.choices[0].finish_reason, 'length');
    assert.equal(r.usage.completion_tokens, 2);
  },

  async completionsStream() {
    const stream = await client.completions.create({ model: 'echo', prompt: 'x y z', stream: true });
    let text = '';
    for await (const chunk of stream) {
      assert.equal(chunk.usage ?? null, null);  // not asked for
      for (const c of chunk.choices) text += c.text;
    }
    assert.equal(text, 'x y z');
  },

  async models() {
    const page = await client.models.list();
    assert.ok(page.data.some((m) => m.id === 'echo'));
  },

  // The embedded default's demo model on the in-process engine (random
  // weights: the text is babble, but its shape and counts are real).
  async localEngineStream() {
    const stream = await client.chat.completions.create({
      model: 'demo',
      messages: [{ role: 'user', content: 'tell me a story' }],
      max_tokens: 12,
      seed: 3,
      stream: true,
      stream_options: { include_usage: true },
    });
    let deltas = 0;
    let usage = null;
    let finish = null;
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        if (c.delta?.content) deltas++;
        if (c.finish_reason) finish = c.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    assert.ok(deltas >= 1, 'no text streamed');
    assert.ok(usage && usage.completion_tokens >= 1 && usage.completion_tokens <= 12);
    assert.ok(finish === 'length' || finish === 'stop');
    const again = await client.completions.create({ model: 'demo', prompt: 'Once', max_tokens: 6, seed: 9 });
    const same = await client.completions.create({ model: 'demo', prompt: 'Once', max_tokens: 6, seed: 9 });
    assert.equal(again.choices[0].text, same.choices[0].text);
  },

  // Log-probabilities from the engine, as the SDK types them.
  async localEngineLogprobs() {
    const r = await client.chat.completions.create({
      model: 'demo',
      messages: [{ role: 'user', content: 'tell me a story' }],
      max_tokens: 8,
      temperature: 0,
      logprobs: true,
      top_logprobs: 2,
    });
    const content = r.choices[0].logprobs?.content;
    assert.ok(Array.isArray(content), 'no logprobs.content');
    assert.equal(content.length, r.usage.completion_tokens);
    for (const t of content) {
      assert.ok(t.logprob <= 0);
      assert.equal(t.top_logprobs.length, 2);
      assert.equal(t.top_logprobs[0].logprob, t.logprob);  // greedy took the likeliest
      assert.ok(Array.isArray(t.bytes));
    }
    const legacy = await client.completions.create({ model: 'demo', prompt: 'Once', max_tokens: 4, logprobs: 1 });
    assert.equal(legacy.choices[0].logprobs.tokens.length, legacy.usage.completion_tokens);
    assert.equal(legacy.choices[0].logprobs.token_logprobs.length, legacy.usage.completion_tokens);
  },

  async localEngineContextError() {
    await expectError(OpenAI.BadRequestError, 400, () =>
      client.completions.create({ model: 'demo', prompt: 'word '.repeat(5000), max_tokens: 4 }));
  },

  async authenticationError() {
    const stranger = new OpenAI({ baseURL, apiKey: 'tg-not-a-real-key', maxRetries: 0 });
    await expectError(OpenAI.AuthenticationError, 401, () =>
      stranger.chat.completions.create({ model: 'echo', messages: [{ role: 'user', content: 'hi' }] }));
  },

  async notFoundError() {
    const e = await expectError(OpenAI.NotFoundError, 404, () =>
      client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'hi' }] }));
    assert.equal(e.code, 'model_not_found');
  },

  async badRequestError() {
    await expectError(OpenAI.BadRequestError, 400, () =>
      client.chat.completions.create({ model: 'echo', temperature: 5, messages: [{ role: 'user', content: 'hi' }] }));
  },

  async rateLimitError() {
    const limited = new OpenAI({ baseURL, apiKey: process.env.TOLLGATE_LIMITED_KEY, maxRetries: 0 });
    const body = { model: 'echo', messages: [{ role: 'user', content: 'hi' }] };
    await limited.chat.completions.create(body);
    const e = await expectError(OpenAI.RateLimitError, 429, () => limited.chat.completions.create(body));
    assert.ok(Number(e.headers?.get?.('retry-after') ?? e.headers?.['retry-after']) > 0);
  },
};

await runChecks(checks);
