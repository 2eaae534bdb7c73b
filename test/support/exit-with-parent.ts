// Preloaded into every node a test starts (node-process.ts): a node whose test process is
// gone stops itself instead of living on as an orphan that holds ports, CPU and memory.
// node:test skips a test's `after` hooks when the test times out, and the file's process
// then ends without stopping the nodes it started.

const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) process.kill(process.pid, 'SIGKILL');
}, 500).unref();
