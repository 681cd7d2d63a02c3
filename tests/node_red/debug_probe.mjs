// Prints what Node-RED's debug sidebar receives: connects to the editor's websocket
// (/comms), subscribes to "debug" like the editor does, and writes one JSON line per
// debug message: {"id": <debug node id>, "name", "topic", "msg": <the decoded message>}.
//   node debug_probe.mjs http://127.0.0.1:1880
import WebSocket from "ws";

const base = new URL(process.argv[2]);
const ws = new WebSocket(`ws://${base.host}${base.pathname.replace(/\/$/, "")}/comms`);
ws.on("open", () => {
  ws.send(JSON.stringify({ subscribe: "debug" }));
  console.log(JSON.stringify({ probe: "subscribed" }));
});
ws.on("message", (data) => {
  let batch = JSON.parse(data.toString());
  if (!Array.isArray(batch)) batch = [batch];
  for (const item of batch) {
    if (item.topic !== "debug") continue;
    const d = item.data;
    let msg = d.msg;
    try {
      msg = JSON.parse(d.msg);
    } catch {
      // a plain string
    }
    console.log(JSON.stringify({ id: d.id, name: d.name, topic: d.topic, msg }));
  }
});
ws.on("error", (err) => {
  console.error(String(err));
  process.exit(1);
});
ws.on("close", () => process.exit(0));
