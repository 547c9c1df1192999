"""The build step pyproject.toml cannot declare: the gRPC stubs of serve/proto/llm.proto.

`build_grpc` runs grpc_tools.protoc (grpcio-tools is a build requirement) as a subcommand of `build`, so
both `pip install .` / a wheel build (stubs written into the build tree, shipped in the wheel) and
`pip install -e .` (PEP 660: setuptools sets `editable_mode`, stubs written next to llm.proto in the
source tree, git-ignored there) produce serve/proto/llm_pb2.py, llm_pb2.pyi and llm_pb2_grpc.py.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

ROOT = Path(__file__).resolve().parent
PROTO = Path("serve/proto/llm.proto")  # relative to ROOT, which is protoc's include root
STUBS = [PROTO.with_name(PROTO.stem + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


class BuildGrpc(Command):
    description = "generate the gRPC stubs of serve/proto/llm.proto"
    user_options: list = []
    editable_mode = False  # set by setuptools for PEP 660 editable installs

    def initialize_options(self) -> None:
        self.build_lib: str | None = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _out(self) -> Path:
        return ROOT if self.editable_mode else Path(self.build_lib)

    def run(self) -> None:
        from grpc_tools import protoc

        out = self._out()
        (out / PROTO.parent).mkdir(parents=True, exist_ok=True)
        args = [
            "protoc",
            f"-I{ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {PROTO}")

    def get_source_files(self) -> list[str]:
        return [str(PROTO)]

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib) / s) for s in STUBS]

    def get_output_mapping(self) -> dict[str, str]:
        return {str(Path(self.build_lib) / s): str(ROOT / s) for s in STUBS} if self.editable_mode else {}


class Build(build):
    sub_commands = [*build.sub_commands, ("build_grpc", None)]  # after build_py: its stubs win


setup(cmdclass={"build": Build, "build_grpc": BuildGrpc})
