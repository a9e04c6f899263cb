// Greedy batch-1 decoding of a GGUF file with llama.cpp (node-llama-cpp's prebuilt CPU build), for
// bench/decode.py: the same prompt token ids as the Python side, exactly N generated tokens, timed
// per token. Prints one JSON line: {"tokens": [...], "decode_tok_s": best over repeats, ...}.
//
//   node bench/peers/llamacpp_decode.mjs MODEL.gguf '[1, 523, 88]' N THREADS REPEATS
import {getLlama} from "node-llama-cpp";

const [modelPath, promptJson, nArg, threadsArg, repeatsArg] = process.argv.slice(2);
const prompt = JSON.parse(promptJson);
const n = parseInt(nArg, 10), threads = parseInt(threadsArg, 10), repeats = parseInt(repeatsArg || "3", 10);

// build "never": use the shipped binaries, never compile llama.cpp here
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const context = await model.createContext({contextSize: Math.max(256, prompt.length + n + 8), threads,
                                           batchSize: 512, sequences: 1});
const seq = context.getSequence();

async function once() {
  await seq.clearHistory();
  const out = [], stamps = [];
  let cpu1 = null;
  const t0 = performance.now();
  // temperature 0: argmax; no repetition penalty (the option is off unless given). An
  // end-of-generation token is yielded like any other (yieldEogToken) and decoding goes on after
  // it, as the Python rows do: exactly n tokens everywhere
  let input = prompt;
  while (out.length < n) {
    const before = out.length;
    for await (const tok of seq.evaluate(input, {temperature: 0, yieldEogToken: true})) {
      out.push(Number(tok));
      stamps.push(performance.now());
      if (out.length === 1) cpu1 = process.cpuUsage();
      if (out.length === n) break;
    }
    if (out.length === before) throw new Error(`llama.cpp produced no token after ${before}`);
    input = [out[out.length - 1]];
  }
  const cpu = process.cpuUsage(cpu1);  // CPU time of the whole process from the 1st token to the Nth
  const decode_s = (stamps[n - 1] - stamps[0]) / 1000;
  return {tokens: out, first_token_ms: stamps[0] - t0, decode_tok_s: (n - 1) / decode_s,
          cpu_tok_s: (n - 1) / ((cpu.user + cpu.system) / 1e6), wall_s: (stamps[n - 1] - t0) / 1000};
}

await once();  // warm-up
let best = null;
for (let r = 0; r < repeats; r++) {
  const res = await once();
  if (best === null || res.decode_tok_s > best.decode_tok_s) best = res;
}
console.log(JSON.stringify({...best, threads: context.currentThreads, gguf: modelPath}));
await context.dispose();
await model.dispose();
