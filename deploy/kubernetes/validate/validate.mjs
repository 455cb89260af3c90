// Validate KEDA and Prometheus-operator resources (JSON documents on stdin, one array)
// against the CRD schemas shipped in @kubernetes-models. Exit 1 on the first invalid one.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const kinds = { ScaledObject, ServiceMonitor };
const docs = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (chunk) => (data += chunk));
  process.stdin.on("end", () => resolve(data));
}));
let failed = false;
for (const doc of docs) {
  const Model = kinds[doc.kind];
  if (!Model) { console.error(`no schema for ${doc.kind}`); failed = true; continue; }
  try {
    new Model(doc).validate();
    console.log(`ok   ${doc.kind}/${doc.metadata.name}`);
  } catch (err) {
    console.error(`FAIL ${doc.kind}/${doc.metadata.name}: ${err.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
