"""digitsapp ServerApp: FedAvg or FedAdam, central evaluation on the test split, one JSON
line of metrics per round."""

import json

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from digitsapp.task import Net, load_data, test
from fedquant.flower import CompressedStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rc = context.run_config
    net = Net()
    _, testloader = load_data(0, 1)
    if rc["strategy"] == "fedadam":
        strategy = FedAdam(fraction_evaluate=0.0, min_available_nodes=rc["min-nodes"],
                           eta=0.2, tau=0.02)
    else:
        strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=rc["min-nodes"])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(net, testloader, "cpu")
        with open(rc["metrics-path"], "a") as f:
            f.write(json.dumps({"round": server_round, "loss": loss, "accuracy": accuracy})
                    + "\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = CompressedStrategy(strategy, codec=rc["codec"])
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()),
                            num_rounds=rc["num-server-rounds"], evaluate_fn=evaluate)
    with open(rc["metrics-path"], "a") as f:
        f.write(json.dumps({"train_metrics": {str(k): dict(v) for k, v in
                                              result.train_metrics_clientapp.items()}}) + "\n")
