"""`her train sft|grpo|genrm|genrm-rl`: run a training config.

    her train sft  --config policy_trainer/configs/sft_cpu_smoke.yaml
    her train genrm --config policy_trainer/configs/genrm_cpu.yaml --pairs pairs.jsonl --output-dir judge/
    her train genrm-rl --config policy_trainer/configs/genrm_rl_cpu.yaml --model judge/ --pairs pairs.jsonl \
        --output-dir judge_rl/
    her train grpo --config policy_trainer/configs/grpo_cpu_smoke.yaml --reward-url http://127.0.0.1:8000

On GPUs, under a launcher (the DeepSpeed settings then come from the accelerate file, so the
training YAML keeps `deepspeed: null`):

    accelerate launch --config_file policy_trainer/configs/accelerate_zero2.yaml
        -m her_cli.main train grpo --config my_grpo.yaml --reward-url http://rm-host:8000   (one line)

Exit codes: 0 finished; 2 the config is wrong (the message says what to change); 3 the run stopped
early because rm_server stayed unreachable past the reward retry budget (no update was made on
missing rewards; the message says at which step).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_CONFIG = 2
EXIT_REWARD_DOWN = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", metavar="MODE", required=True)
    sft = sub.add_parser("sft", help="cold start on dual-layer SFT samples (loss on the final turn)",
                         description="SFT cold start with TRL's SFTTrainer, configured from a YAML file.")
    grpo = sub.add_parser("grpo", help="GRPO with rewards from rm_server",
                          description="GRPO with TRL's GRPOTrainer and rewards from rm_server over HTTP, "
                                      "configured from a YAML file.")
    genrm = sub.add_parser("genrm", help="fine-tune a judge on labelled pairs (her build negatives / teacher-pairs)",
                           description="GenRM training with TRL's SFTTrainer on labelled pairs; the output "
                                       "folder serves as is with `her serve --model DIR`.")
    genrm_rl = sub.add_parser("genrm-rl", help="the judge's RL stage: GRPO on verdict = label, both orders agreeing",
                              description="GRPO with TRL's GRPOTrainer on a judge's fast verdicts: reward 1 for the "
                                          "labelled winner plus a bonus when both presentation orders agree.")
    genrm_rl.add_argument("--model", default=None, metavar="DIR",
                          help="the judge to start from (a `her train genrm` folder); overrides model.name_or_path")
    for sp in (sft, grpo):
        sp.add_argument("--model", default=None, metavar="MODEL",
                        help="the policy to start from (bundled id or HF folder, e.g. an SFT output); overrides "
                             "the config's model section")
        sp.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="sample files (`her build policy` sft/ or grpo/ jsonl); override data.jsonl and "
                             "data.scene_files")
    genrm.add_argument("--modes", nargs="+", choices=["fast", "cot"], default=None,
                       help="answers to train; override data.modes of the config")
    genrm.add_argument("--consistency-weight", type=float, default=None, metavar="W",
                       help="weight of the order-consistency term; overrides consistency_weight (0: plain SFT)")
    for sp in (genrm, genrm_rl):
        sp.add_argument("--pairs", nargs="+", default=None, metavar="FILE",
                        help="labelled pair files; override data.pairs of the config")
    for sp in (sft, grpo, genrm, genrm_rl):
        sp.add_argument("--config", required=True, metavar="FILE",
                        help="training YAML (see policy_trainer/configs/*_cpu_smoke.yaml)")
        sp.add_argument("--output-dir", default=None, metavar="DIR", help="override the config's output_dir")
        sp.add_argument("--max-steps", type=int, default=None, metavar="N", help="override max_steps")
        sp.add_argument("--log-level", default="info", help="Python log level (default: info)")
    grpo.add_argument("--reward-url", default=None, metavar="URL",
                      help="rm_server base URL, or several comma-separated (failover); overrides reward.url")
    grpo.add_argument("--resume", action="store_true",
                      help="continue from the last checkpoint in the output folder (after a killed run); none yet: "
                           "start from the beginning")
    grpo.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                      help="serve the reward statistics at :PORT/metrics for Prometheus; overrides metrics_port")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ._setup import ConfigError

    try:
        if args.train_command == "grpo":
            from ._grpo import GRPORun, GRPORunConfig

            grpo_config = GRPORunConfig.from_yaml(args.config, reward_url=args.reward_url,
                                                  output_dir=args.output_dir, max_steps=args.max_steps,
                                                  model=args.model, data_files=args.data)
            if args.metrics_port is not None:
                grpo_config.metrics_port = args.metrics_port
            reward = grpo_config.reward
            print(f"her train grpo: rewards from {reward.url} ({reward.strategy}, {reward.judge_mode}); "
                  f"DeepSpeed: {grpo_config.deepspeed or 'off'}", flush=True)
            grpo_run = GRPORun(grpo_config)
            try:
                result = grpo_run.train(resume=args.resume)
            finally:
                grpo_run.close()
        elif args.train_command == "genrm":
            from ._genrm import GenRMRun, GenRMRunConfig

            genrm_config = GenRMRunConfig.from_yaml(args.config, output_dir=args.output_dir,
                                                    max_steps=args.max_steps, pairs=args.pairs, modes=args.modes,
                                                    consistency_weight=args.consistency_weight)
            result = GenRMRun(genrm_config).train()
        elif args.train_command == "genrm-rl":
            from ._genrm_rl import GenRMRLRun, GenRMRLRunConfig

            rl_config = GenRMRLRunConfig.from_yaml(args.config, model=args.model, output_dir=args.output_dir,
                                                   max_steps=args.max_steps, pairs=args.pairs)
            result = GenRMRLRun(rl_config).train()
        else:
            from ._sft import SFTRun, SFTRunConfig

            sft_config = SFTRunConfig.from_yaml(args.config, output_dir=args.output_dir, max_steps=args.max_steps,
                                                model=args.model, data_files=args.data)
            result = SFTRun(sft_config).train()
    except ConfigError as exc:
        print(f"her train {args.train_command}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    summary = {"global_step": result.global_step, "engine": result.engine, "zero_stage": result.zero_stage,
               "output_dir": result.output_dir}
    if result.stopped:
        print(f"her train {args.train_command}: stopped: {result.stopped}", file=sys.stderr)
        print(json.dumps(summary), flush=True)
        return EXIT_REWARD_DOWN
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m policy_trainer.cli grpo --config ...`: the form launchers start (`accelerate launch -m`)."""
    parser = argparse.ArgumentParser(prog="python -m policy_trainer.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
