// A Node.js client of inference-worker, written from docs/wire.md only.
//
// Sends the held-out digits (heldout.json: 8x8 images, pixel values 0..16, as the model's
// config.yaml says) to the `digits` model over MQTT 5, prints accuracy and latency, then
// resends some requests with the same ids and checks that the answers are the stored
// ones (byte-identical: the worker answered from its ledger, without a second inference).
//
//   npm ci && node digits.mjs
//
// Settings (environment): BROKER_URL (mqtt://127.0.0.1:1883), MQTT_USERNAME,
// MQTT_PASSWORD, REQUEST_TOPIC (request_message), RESPONSE_TOPIC (response_message),
// CODEC (msgpack | json; Node 20 has no zstd), COUNT (all), CONCURRENCY (32),
// RESEND (20: how many ids to send again), TIMEOUT_MS (30000), HELDOUT (./heldout.json).
// The last line printed is one JSON object with the results.

import { readFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { performance } from "node:perf_hooks";
import mqtt from "mqtt";
import { encode, decode } from "@msgpack/msgpack";

const env = process.env;
const BROKER_URL = env.BROKER_URL ?? "mqtt://127.0.0.1:1883";
const REQUEST_TOPIC = env.REQUEST_TOPIC ?? "request_message";
const RESPONSE_TOPIC = env.RESPONSE_TOPIC ?? "response_message";
const CODEC = env.CODEC ?? "msgpack";
const CONCURRENCY = Number(env.CONCURRENCY ?? 32);
const RESEND = Number(env.RESEND ?? 20);
const TIMEOUT_MS = Number(env.TIMEOUT_MS ?? 30000);
const RESEND_AFTER_MS = 5000; // resend an unanswered request (same id, same bytes)
const HELDOUT = env.HELDOUT ?? new URL("./heldout.json", import.meta.url);

if (!["msgpack", "json"].includes(CODEC)) throw new Error(`CODEC must be msgpack or json`);
const { x, y } = JSON.parse(readFileSync(HELDOUT, "utf8"));
const count = Math.min(Number(env.COUNT ?? x.length), x.length);

// docs/wire.md section 2: the reply topic must be on the worker's allow-list; without an
// app that is <response topic>/_/<something unique>.
const clientId = `node-digits-${randomUUID().slice(0, 8)}`;
const replyTopic = `${RESPONSE_TOPIC}/_/${clientId}`;

// ---- wire format (docs/wire.md sections 3-5) -------------------------------------------

function float32Bytes(values) {
  // binary tensor data: little-endian, C order
  const view = new DataView(new ArrayBuffer(values.length * 4));
  values.forEach((v, i) => view.setFloat32(i * 4, v, true));
  return new Uint8Array(view.buffer);
}

function encodeRequest(id, pixels) {
  const tensor =
    CODEC === "json"
      ? { dtype: "float32", shape: [1, 64], data: [pixels] }
      : { dtype: "float32", shape: [1, 64], data: float32Bytes(pixels) };
  const request = { id, model: "digits", inputs: { pixels: tensor } };
  return CODEC === "json" ? Buffer.from(JSON.stringify(request)) : Buffer.from(encode(request));
}

function decodeResponse(buf) {
  // msgpack maps start with 0x80-0x8f / 0xde / 0xdf, JSON objects with "{"
  return buf[0] === 0x7b ? JSON.parse(buf.toString("utf8")) : decode(buf);
}

function firstLabel(tensor) {
  // `label` is int64 [n]: a list in JSON, 8 little-endian bytes per value in msgpack
  if (Array.isArray(tensor.data)) return Number(tensor.data.flat()[0]);
  const bytes = tensor.data;
  return Number(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigInt64(0, true));
}

// ---- request/response over MQTT 5 -------------------------------------------------------

const client = mqtt.connect(BROKER_URL, {
  protocolVersion: 5,
  clientId,
  clean: true,
  username: env.MQTT_USERNAME,
  password: env.MQTT_PASSWORD,
  reconnectPeriod: 1000,
});
const pending = new Map(); // id -> {resolve, reject}

client.on("message", (_topic, payload) => {
  let response;
  try {
    response = decodeResponse(payload);
  } catch {
    return; // not a wire message
  }
  const waiter = pending.get(response.id);
  if (waiter === undefined) return; // a duplicate answer for an id nobody waits for
  pending.delete(response.id);
  waiter.resolve({ response, raw: Buffer.from(payload) });
});

function publish(payload) {
  return new Promise((resolve, reject) =>
    client.publish(
      REQUEST_TOPIC,
      payload,
      { qos: 1, properties: { responseTopic: replyTopic } },
      (err) => (err ? reject(err) : resolve()),
    ),
  );
}

async function send(id, payload) {
  // Publish, resend the same bytes every RESEND_AFTER_MS until answered or TIMEOUT_MS.
  const started = performance.now();
  const answered = new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
  let timer;
  const resend = async () => {
    if (performance.now() - started > TIMEOUT_MS) {
      pending.get(id)?.reject(new Error(`no answer for ${id} within ${TIMEOUT_MS} ms`));
      pending.delete(id);
      return;
    }
    await publish(payload);
    timer = setTimeout(resend, RESEND_AFTER_MS);
  };
  try {
    await resend();
    const reply = await answered;
    return { ...reply, latencyMs: performance.now() - started };
  } finally {
    clearTimeout(timer);
  }
}

async function pool(items, worker) {
  const results = new Array(items.length);
  let next = 0;
  const lanes = Array.from({ length: Math.min(CONCURRENCY, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await worker(items[i], i);
    }
  });
  await Promise.all(lanes);
  return results;
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function main() {
  await new Promise((resolve, reject) => {
    client.once("connect", resolve);
    client.once("error", reject);
  });
  // Subscribe before publishing: MQTT keeps nothing for a subscriber that is not there.
  await client.subscribeAsync(replyTopic, { qos: 1 });

  const run = randomUUID().slice(0, 8);
  const requests = x.slice(0, count).map((pixels, i) => {
    const id = `node-${run}-${i}`;
    return { id, payload: encodeRequest(id, pixels), label: y[i] };
  });

  const replies = await pool(requests, (r) => send(r.id, r.payload));
  let correct = 0;
  const errors = {};
  for (const [i, { response }] of replies.entries()) {
    if (response.status === "ok") {
      if (firstLabel(response.outputs.label) === requests[i].label) correct += 1;
    } else {
      errors[response.error.code] = (errors[response.error.code] ?? 0) + 1;
    }
  }
  const latencies = replies.map((r) => r.latencyMs).sort((a, b) => a - b);

  // The same ids (and bytes) again: answered from the worker's ledger, byte-identical.
  const again = requests.slice(0, Math.min(RESEND, count));
  const resent = await pool(again, (r) => send(r.id, r.payload));
  const identical = resent.filter((r, i) => r.raw.equals(replies[i].raw)).length;

  const result = {
    codec: CODEC,
    count,
    accuracy: correct / count,
    errors,
    p50_ms: Number(percentile(latencies, 50).toFixed(2)),
    p99_ms: Number(percentile(latencies, 99).toFixed(2)),
    resent: again.length,
    resent_identical: identical,
  };
  console.log(`${count} digits over ${BROKER_URL} (${CODEC}): accuracy ${result.accuracy.toFixed(4)}`);
  console.log(`latency p50 ${result.p50_ms} ms, p99 ${result.p99_ms} ms`);
  console.log(`resent ${again.length} ids: ${identical} answered with the identical stored bytes`);
  console.log(JSON.stringify(result));
}

main()
  .then(() => client.endAsync())
  .catch(async (err) => {
    console.error(err);
    await client.endAsync(true);
    process.exitCode = 1;
  });
