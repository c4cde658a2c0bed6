// BullMQ no-op throughput: one Worker runs N jobs that do nothing.
//
//   node noop.mjs --redis-url redis://127.0.0.1:6379/0 --jobs 5000 --concurrency 50
//
// A fresh queue name per run. The N jobs are added first (addBulk, chunks of 1000,
// removeOnComplete/removeOnFail), then one Worker (concurrency C, processor
// `async () => null`) is connected; the clock runs from worker.run() until the N-th
// 'completed' event. The queue is then obliterated and every connection closed.
// Prints one JSON line: {"jobs": N, "seconds": S, "rate": R}. Any error: a message on
// stderr and exit status 1.
//
// Connections are ioredis instances made here (BullMQ 6 loads ioredis with `require`
// only, which an ES module does not have); BullMQ duplicates the worker's one for its
// blocking reads. Driven by bench/bullmq_runner.py.

import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";

import { Queue, Worker } from "bullmq";
import { Redis } from "ioredis";

const CHUNK = 1000;

function positiveInt(name, text) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) {
    throw new Error(`--${name} must be a positive integer, got ${JSON.stringify(text)}`);
  }
  return value;
}

function options() {
  const { values } = parseArgs({
    options: {
      "redis-url": { type: "string" },
      jobs: { type: "string" },
      concurrency: { type: "string", default: "50" },
    },
    strict: true,
  });
  if (!values["redis-url"]) throw new Error("--redis-url is required");
  if (values.jobs === undefined) throw new Error("--jobs is required");
  return {
    redisUrl: values["redis-url"],
    jobs: positiveInt("jobs", values.jobs),
    concurrency: positiveInt("concurrency", values.concurrency),
  };
}

function connect(url) {
  // maxRetriesPerRequest: null is what BullMQ requires for a worker's connections.
  const client = new Redis(url, { maxRetriesPerRequest: null, lazyConnect: true });
  client.on("error", () => {}); // surfaced through the failing command instead
  return client;
}

function redacted(url) {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return "(unparsable URL)";
  }
}

async function main() {
  const { redisUrl, jobs, concurrency } = options();
  const name = `noop-bench-${Date.now()}-${randomBytes(4).toString("hex")}`;
  const queueConn = connect(redisUrl);
  const workerConn = connect(redisUrl);
  let queue;
  let worker;
  try {
    try {
      await queueConn.connect();
      await workerConn.connect();
    } catch (err) {
      throw new Error(`cannot connect to Redis at ${redacted(redisUrl)}: ${err?.message ?? err}`);
    }
    queue = new Queue(name, { connection: queueConn });
    await queue.waitUntilReady();

    const opts = { removeOnComplete: true, removeOnFail: true };
    for (let start = 0; start < jobs; start += CHUNK) {
      const size = Math.min(CHUNK, jobs - start);
      await queue.addBulk(Array.from({ length: size }, () => ({ name: "noop", data: {}, opts })));
    }

    worker = new Worker(name, async () => null, {
      connection: workerConn,
      concurrency,
      autorun: false,
    });
    await worker.waitUntilReady();

    let completed = 0;
    let started = 0;
    const done = new Promise((resolve, reject) => {
      worker.on("completed", () => {
        completed += 1;
        if (completed === jobs) resolve(performance.now() - started);
      });
      worker.on("failed", (job, err) => {
        reject(new Error(`job ${job?.id} failed: ${err?.message ?? err}`));
      });
      worker.on("error", (err) => reject(err));
    });

    started = performance.now();
    const running = worker.run();
    running.catch(() => {}); // an error here also reaches the 'error' listener
    const elapsedMs = await done;
    const seconds = elapsedMs / 1000;

    await worker.close();
    await running;
    worker = undefined;
    await queue.obliterate({ force: true });
    await queue.close();
    queue = undefined;

    process.stdout.write(
      `${JSON.stringify({ jobs, seconds: Number(seconds.toFixed(6)), rate: Number((jobs / seconds).toFixed(1)) })}\n`,
    );
  } finally {
    // Best effort on the error path; the normal path closed these above.
    if (worker) await worker.close(true).catch(() => {});
    if (queue) await queue.close().catch(() => {});
    queueConn.disconnect();
    workerConn.disconnect();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bullmq noop benchmark failed: ${err?.message ?? err}\n`);
    process.exit(1);
  },
);
