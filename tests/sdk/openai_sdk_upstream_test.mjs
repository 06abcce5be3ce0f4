// The official OpenAI SDK through Tollgate to a remote OpenAI-compatible
// upstream (the fake one of tests/e2e/fake_openai.py): tool calls, streamed
// and whole, logprobs and embeddings as the SDK types and assembles them.
// Run by tests/e2e/openai_sdk_test.cpp with TOLLGATE_BASE_URL and TOLLGATE_KEY.
import assert from 'node:assert/strict';
import OpenAI from 'openai';

import { runChecks } from './run_checks.mjs';

const client = new OpenAI({
  baseURL: process.env.TOLLGATE_BASE_URL,
  apiKey: process.env.TOLLGATE_KEY,
  maxRetries: 0,
  timeout: 20000,
});

const weather = {
  type: 'function',
  function: {
    name: 'get_weather',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};

const checks = {
  async toolCall() {
    const r = await client.chat.completions.create({
      model: 'm-tools',
      messages: [{ role: 'user', content: 'Weather in Paris?' }],
      tools: [weather],
    });
    assert.equal(r.choices[0].finish_reason, 'tool_calls');
    const call = r.choices[0].message.tool_calls[0];
    assert.equal(call.function.name, 'get_weather');
    assert.deepEqual(JSON.parse(call.function.arguments), { city: 'Paris' });
  },

  // The SDK's own stream helper assembles the tool call from its pieces.
  async toolCallStream() {
    const stream = client.chat.completions.stream({
      model: 'm-tools',
      messages: [{ role: 'user', content: 'Weather in Paris?' }],
      tools: [weather],
    });
    const done = await stream.finalChatCompletion();
    const call = done.choices[0].message.tool_calls[0];
    assert.equal(call.id, 'call_1');
    assert.equal(call.function.name, 'get_weather');
    assert.equal(call.function.arguments, '{"city": "Paris"}');
    assert.equal(done.choices[0].finish_reason, 'tool_calls');
  },

  async toolResultTurn() {
    // The tool's answer goes back as a tool message; the upstream sees it as sent.
    const r = await client.chat.completions.create({
      model: 'm-normal',
      messages: [
        { role: 'user', content: 'Weather in Paris?' },
        { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
        { role: 'tool', tool_call_id: 'call_1', content: '18 C, sunny' },
      ],
      tools: [weather],
    });
    assert.equal(r.choices[0].message.content, 'Hello from fake upstream');
    assert.equal(r.usage.prompt_tokens_details.cached_tokens, 3);
  },

  async logprobs() {
    const r = await client.chat.completions.create({
      model: 'm-normal',
      messages: [{ role: 'user', content: 'hi' }],
      logprobs: true,
      top_logprobs: 2,
    });
    const content = r.choices[0].logprobs.content;
    assert.deepEqual(content.map((t) => t.token), ['Hello', ' from', ' fake', ' upstream']);
    assert.equal(content[0].top_logprobs.length, 2);
  },

  async embeddings() {
    const r = await client.embeddings.create({ model: 'm-normal', input: ['one', 'two'], encoding_format: 'float' });
    assert.equal(r.data.length, 2);
    assert.equal(r.data[1].embedding.length, 3);
    assert.equal(r.model, 'm-normal');
    assert.equal(r.usage.prompt_tokens, 14);
  },
};

await runChecks(checks);
