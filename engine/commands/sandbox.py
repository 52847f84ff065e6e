"""`evolve sandbox build|check`: build the Docker sandbox image, or prove its isolation."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

console = Console()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evolve sandbox", description="Build or check the Docker sandbox.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build the sandbox image (the CPU image offline, or the GPU image)")
    build.add_argument("--gpu", action="store_true", help="build the GPU image from Dockerfile.gpu (needs a registry)")
    build.add_argument("--tag", help="image tag (default: evolve-sandbox:cpu, or evolve-sandbox:gpu with --gpu)")
    build.add_argument("--base-image", help="base image of the GPU build (a CUDA PyTorch image)")
    build.add_argument("--force", action="store_true", help="rebuild the base image and wheels even when cached")

    check = commands.add_parser("check", help="run self-test containers that prove network, environment and "
                                              "filesystem isolation")
    check.add_argument("--image", default="evolve-sandbox:cpu", help="image to check (default: evolve-sandbox:cpu)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from sandbox.backend import SandboxUnavailable

    if args.command == "build":
        from sandbox.image import ImageBuildError, build_image

        options = {"gpu": args.gpu, "tag": args.tag, "force": args.force}
        if args.base_image:
            options["base_image"] = args.base_image
        try:
            report = build_image(**options)
        except ImageBuildError as error:
            console.print(f"[red]error:[/] {error}")
            return 1
        console.print(f"built {report.tag}: {report.size_mb:.0f} MiB in {report.seconds:.0f} s")
        return 0

    from sandbox.docker_backend import DockerBackend
    from sandbox.image import self_check

    try:
        backend = DockerBackend(run_id="selfcheck", image=args.image)
        report = self_check(backend)
    except SandboxUnavailable as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    console.print(str(report))
    console.print("[green]all isolation checks passed[/]" if report.passed else "[red]isolation checks FAILED[/]")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
