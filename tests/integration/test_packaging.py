"""The deployable bundles build, repeat byte for byte, import on their own, and deploy.

Building downloads the Lambda wheels from PyPI once (pip's cache serves reruns). The
import checks run the project's interpreter with ``-I -S``: no site-packages, no
environment, no working directory, so a module resolves only from the unzipped bundle
or from a folder standing in for the Lambda runtime (boto3 and what it needs).

The deploy tests run ``infra.deploy`` against moto's in-memory S3 and botocore
Stubbers for CloudFormation and EMR Serverless: moto's CloudFormation cannot create
this template (it skips Firehose, Scheduler and EMR Serverless resources and then fails
on their outputs), so the tests check the calls the deploy makes instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from cfnlint.decode import cfn_yaml
from moto import mock_aws

from infra import deploy, package
from infra.package import Artifact

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: What the python3.11 Lambda runtime provides besides the standard library.
LAMBDA_RUNTIME_PACKAGES = (
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "dateutil",
    "urllib3",
    "six",
)
PROJECT_PACKAGES = {"encore", "lambdas", "spark_streaming", "batch"}
REGION = "us-east-1"
STACK = "encore-test"
STACK_ID = f"arn:aws:cloudformation:{REGION}:123456789012:stack/{STACK}/1"
SECRET_ARN = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:encore-db-AbCdEf"
APP_ARN = f"arn:aws:emr-serverless:{REGION}:123456789012:/applications/00abc"
JOB_ARN = f"{APP_ARN}/jobruns/run-0000000000"
ROLE_ARN = "arn:aws:iam::123456789012:role/encore-spark"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def artifacts(build_dir: Path) -> dict[str, Artifact]:
    return package.build(build_dir)


def handler_of(function: str) -> str:
    template = cfn_yaml.load(str(ROOT / "infra" / "template.yaml"))
    return str(template["Resources"][function]["Properties"]["Handler"])


def project_modules(bundle: Path) -> list[str]:
    """Dotted names of the project's modules in a zip."""
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
    return sorted(
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in names
        if name.endswith(".py") and name.split("/")[0] in PROJECT_PACKAGES
    )


def import_isolated(
    modules: list[str], handler: str, *paths: Path, cwd: Path, site: bool = False
) -> dict[str, Any]:
    """Import ``modules`` with only ``paths`` (and the standard library) importable.

    Returns each module's file and whether ``handler`` names a callable.
    """
    script = f"""
import importlib, json, sys
sys.path[:0] = {[str(path) for path in paths]!r}
files = {{name: importlib.import_module(name).__file__ for name in {modules!r}}}
module, _, attribute = {handler!r}.rpartition(".")
handler = getattr(importlib.import_module(module), attribute, None) if module else None
print(json.dumps({{"files": files, "handler": callable(handler)}}))
"""
    flags = ["-I"] if site else ["-I", "-S"]
    result = subprocess.run(
        [sys.executable, *flags, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.splitlines()[-1]))


# ---------------------------------------------------------------- building


def test_a_second_build_reuses_every_bundle(
    build_dir: Path, artifacts: dict[str, Artifact]
) -> None:
    again = package.build(build_dir)

    assert {name: a.rebuilt for name, a in again.items()} == {n: False for n in artifacts}
    assert {name: a.sha256 for name, a in again.items()} == {
        name: a.sha256 for name, a in artifacts.items()
    }


def test_bundles_are_byte_for_byte_repeatable(
    tmp_path: Path, build_dir: Path, artifacts: dict[str, Artifact]
) -> None:
    elsewhere = package.build(tmp_path, wheel_dir=build_dir / "wheels")

    assert {name: a.sha256 for name, a in elsewhere.items()} == {
        name: a.sha256 for name, a in artifacts.items()
    }


@pytest.mark.parametrize(
    ("bundle", "function", "third_party"),
    [
        (
            "capture",
            "CaptureFunction",
            ["psycopg2", "aws_kinesis_agg.aggregator", "google.protobuf", "six"],
        ),
        ("presign", "PresignFunction", []),
    ],
)
def test_lambda_bundle_imports_on_its_own(
    tmp_path: Path,
    artifacts: dict[str, Artifact],
    bundle: str,
    function: str,
    third_party: list[str],
) -> None:
    handler = handler_of(function)
    handler_source = ROOT / (handler.rsplit(".", 1)[0].replace(".", "/") + ".py")
    if not handler_source.exists():
        pytest.skip(f"{handler_source.relative_to(ROOT)} is not written yet")
    unzipped, runtime = tmp_path / "bundle", tmp_path / "runtime"
    with zipfile.ZipFile(artifacts[bundle].paths[0]) as archive:
        archive.extractall(unzipped)
    runtime.mkdir()
    for name in LAMBDA_RUNTIME_PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            (runtime / name).symlink_to(origin.parent)
        else:  # a single-module distribution such as six
            (runtime / origin.name).symlink_to(origin)

    modules = project_modules(artifacts[bundle].paths[0]) + third_party
    report = import_isolated(modules, handler, unzipped, runtime, cwd=tmp_path)

    assert report["handler"] is True
    assert handler.rsplit(".", 1)[0] in report["files"]
    outside = {m: f for m, f in report["files"].items() if not f.startswith(str(unzipped))}
    assert outside == {}


def test_spark_bundle_imports_from_the_zip(tmp_path: Path, artifacts: dict[str, Artifact]) -> None:
    pyfiles, *scripts = artifacts["spark"].paths
    modules = project_modules(pyfiles)

    # site stays on: the jobs import pyspark and numpy, which come with the Spark image.
    report = import_isolated(modules, "", pyfiles, cwd=tmp_path, site=True)

    assert {"spark_streaming.popularity", "batch.recommend", "encore.settings"} <= set(modules)
    assert [m for m, f in report["files"].items() if not f.startswith(str(pyfiles))] == []
    for built in scripts:
        source = ROOT / package.SPARK_ENTRY_POINTS[built.name]
        assert built.read_bytes() == source.read_bytes()


# ---------------------------------------------------------------- deploying


def declared_parameters() -> list[dict[str, Any]]:
    """What CloudFormation's ValidateTemplate answers for the template."""
    template = cfn_yaml.load(str(ROOT / "infra" / "template.yaml"))
    declared = []
    for key, parameter in template["Parameters"].items():
        item: dict[str, Any] = {"ParameterKey": key, "NoEcho": bool(parameter.get("NoEcho"))}
        if "Default" in parameter:
            item["DefaultValue"] = str(parameter["Default"])
        declared.append(item)
    return declared


def stack_description(status: str, parameters: dict[str, str], outputs: dict[str, str]) -> Any:
    return {
        "Stacks": [
            {
                "StackName": STACK,
                "StackId": STACK_ID,
                "StackStatus": status,
                "CreationTime": datetime(2024, 1, 1, tzinfo=UTC),
                "Parameters": [
                    {"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()
                ],
                "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()],
            }
        ]
    }


EVENT = {
    "StackId": STACK_ID,
    "EventId": "event-1",
    "StackName": STACK,
    "LogicalResourceId": STACK,
    "ResourceStatus": "CREATE_COMPLETE",
    "Timestamp": datetime(2024, 1, 1, tzinfo=UTC),
}
OUTPUTS = {
    "BucketName": "my-encore",
    "EmrApplicationId": "00abc",
    "SparkJobRoleArn": ROLE_ARN,
    "PopularityEntryPoint": "s3://code/encore/spark/0123/popularity.py",
    "SparkSubmitParameters": "--py-files s3://code/encore/spark/0123/pyfiles.zip",
}
RUNNING_JOB = {
    "applicationId": "00abc",
    "id": "run-0",
    "name": "encore-popularity",
    "arn": JOB_ARN,
    "createdBy": ROLE_ARN,
    "createdAt": datetime(2024, 1, 1, tzinfo=UTC),
    "updatedAt": datetime(2024, 1, 1, tzinfo=UTC),
    "executionRole": ROLE_ARN,
    "state": "RUNNING",
    "stateDetails": "running",
    "releaseLabel": "emr-7.9.0",
}
NEW_STACK_OPTIONS = {
    "--stack": STACK,
    "--region": REGION,
    "--db-secret-arn": SECRET_ARN,
    "--subnets": "subnet-1,subnet-2",
    "--security-groups": "sg-1",
    "--code-bucket": "code",
    "--spark-image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/encore-spark:1",
    "--bucket": "my-encore",
    "--poll-seconds": "0",
}
NEW_STACK_ARGS = [part for option in NEW_STACK_OPTIONS.items() for part in option]


@pytest.fixture
def aws() -> Any:
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="code")
        cfn = boto3.client("cloudformation", region_name=REGION)
        emr = boto3.client("emr-serverless", region_name=REGION)
        with Stubber(cfn) as cfn_stub, Stubber(emr) as emr_stub:
            yield deploy.AwsClients(cfn, s3, emr), cfn_stub, emr_stub
            cfn_stub.assert_no_pending_responses()
            emr_stub.assert_no_pending_responses()


def code_parameters(artifacts: dict[str, Artifact]) -> dict[str, str]:
    return {
        "CaptureCodeKey": f"encore/lambda/capture-{artifacts['capture'].digest}.zip",
        "PresignCodeKey": f"encore/lambda/presign-{artifacts['presign'].digest}.zip",
        "SparkCodePrefix": f"encore/spark/{artifacts['spark'].digest}/",
    }


def test_deploy_creates_the_stack_with_the_uploaded_bundles(
    aws: Any, build_dir: Path, artifacts: dict[str, Artifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, cfn_stub, _ = aws
    monkeypatch.setenv("ENCORE_PRESIGN_SECRET", "token-secret")
    values = {
        "BucketName": "my-encore",
        "CodeBucket": "code",
        "DatabaseSecretArn": SECRET_ARN,
        "PresignSecret": "token-secret",
        "SecurityGroupIds": "sg-1",
        "SparkImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/encore-spark:1",
        "SubnetIds": "subnet-1,subnet-2",
        **code_parameters(artifacts),
    }
    cfn_stub.add_client_error(
        "describe_stacks", "ValidationError", f"Stack with id {STACK} does not exist"
    )
    cfn_stub.add_response("validate_template", {"Parameters": declared_parameters()})
    cfn_stub.add_response(
        "create_stack",
        {"StackId": STACK_ID},
        {
            "StackName": STACK,
            "TemplateBody": deploy.TEMPLATE.read_text(),
            "Parameters": [
                {"ParameterKey": k, "ParameterValue": values[k]} for k in sorted(values)
            ],
            "Capabilities": ["CAPABILITY_IAM"],
            "Tags": [{"Key": "project", "Value": "encore"}],
        },
    )
    cfn_stub.add_response("describe_stacks", stack_description("CREATE_COMPLETE", values, OUTPUTS))
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [EVENT]})

    code = deploy.main([*NEW_STACK_ARGS, "--build-dir", str(build_dir)], clients=clients)

    assert code == 0
    uploaded = clients.s3.list_objects_v2(Bucket="code")["Contents"]
    spark_prefix = values["SparkCodePrefix"]
    assert sorted(item["Key"] for item in uploaded) == sorted(
        [values["CaptureCodeKey"], values["PresignCodeKey"]]
        + [spark_prefix + name for name in ("pyfiles.zip", "popularity.py", "recommend.py")]
    )


def test_an_update_keeps_previous_values_and_skips_uploaded_bundles(
    aws: Any,
    build_dir: Path,
    artifacts: dict[str, Artifact],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clients, cfn_stub, _ = aws
    caplog.set_level(logging.INFO, logger="infra.deploy")
    monkeypatch.delenv("ENCORE_PRESIGN_SECRET", raising=False)
    code = code_parameters(artifacts)
    for path, key in [
        (artifacts["capture"].paths[0], code["CaptureCodeKey"]),
        (artifacts["presign"].paths[0], code["PresignCodeKey"]),
    ]:
        clients.s3.upload_file(str(path), "code", key)
    previous = {"CodeBucket": "code", "DatabaseSecretArn": SECRET_ARN, "PresignSecret": "****"}
    cfn_stub.add_response("describe_stacks", stack_description("CREATE_COMPLETE", previous, {}))
    cfn_stub.add_response("validate_template", {"Parameters": declared_parameters()})
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [EVENT]})
    cfn_stub.add_response(
        "update_stack",
        {"StackId": STACK_ID},
        {
            "StackName": STACK,
            "TemplateBody": ANY,
            "Parameters": [{"ParameterKey": k, "ParameterValue": code[k]} for k in sorted(code)]
            + [{"ParameterKey": k, "UsePreviousValue": True} for k in sorted(previous)],
            "Capabilities": ["CAPABILITY_IAM"],
            "Tags": ANY,
        },
    )
    cfn_stub.add_response("describe_stacks", stack_description("UPDATE_COMPLETE", previous, {}))
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [EVENT]})

    exit_code = deploy.main(
        ["--stack", STACK, "--poll-seconds", "0", "--build-dir", str(build_dir)], clients=clients
    )

    assert exit_code == 0
    assert "bundles in s3://code/encore/: 3 uploaded, 2 already there" in caplog.messages


def test_an_update_without_changes_reports_the_stack_up_to_date(
    aws: Any, build_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, cfn_stub, _ = aws
    monkeypatch.delenv("ENCORE_PRESIGN_SECRET", raising=False)
    previous = {"CodeBucket": "code"}
    cfn_stub.add_response(
        "describe_stacks", stack_description("UPDATE_COMPLETE", previous, OUTPUTS)
    )
    cfn_stub.add_response("validate_template", {"Parameters": declared_parameters()})
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [EVENT]})
    cfn_stub.add_client_error("update_stack", "ValidationError", "No updates are to be performed.")

    code = deploy.main(["--stack", STACK, "--build-dir", str(build_dir)], clients=clients)

    assert code == 0
    assert "EmrApplicationId: 00abc" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("pair", "message", "asks_cloudformation"),
    [
        ("Colour=blue", "the template has no parameter Colour", True),
        ("Colour", "'Colour' is not KEY=VALUE", False),
    ],
)
def test_deploy_names_what_is_wrong_with_a_parameter(
    aws: Any,
    capsys: pytest.CaptureFixture[str],
    pair: str,
    message: str,
    asks_cloudformation: bool,
) -> None:
    clients, cfn_stub, _ = aws
    if asks_cloudformation:
        cfn_stub.add_client_error(
            "describe_stacks", "ValidationError", "Stack with id x does not exist"
        )
        cfn_stub.add_response("validate_template", {"Parameters": declared_parameters()})

    code = deploy.main([*NEW_STACK_ARGS, "--parameter", pair], clients=clients)

    assert code == 2
    assert message in capsys.readouterr().err


def test_a_new_stack_needs_the_required_options(
    aws: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, cfn_stub, _ = aws
    monkeypatch.delenv("ENCORE_PRESIGN_SECRET", raising=False)
    cfn_stub.add_client_error(
        "describe_stacks", "ValidationError", "Stack with id x does not exist"
    )
    cfn_stub.add_response("validate_template", {"Parameters": declared_parameters()})

    code = deploy.main(["--stack", STACK, "--code-bucket", "code"], clients=clients)

    assert code == 2
    assert (
        "a new stack needs --db-secret-arn, --security-groups, --spark-image, --subnets"
        in capsys.readouterr().err
    )


def test_a_failed_create_names_the_first_failure(
    aws: Any, build_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, cfn_stub, _ = aws
    monkeypatch.setenv("ENCORE_PRESIGN_SECRET", "token-secret")
    failed = {
        **EVENT,
        "EventId": "event-2",
        "LogicalResourceId": "SparkApplication",
        "ResourceStatus": "CREATE_FAILED",
        "ResourceStatusReason": "image not found",
    }
    cfn_stub.add_client_error(
        "describe_stacks", "ValidationError", "Stack with id x does not exist"
    )
    cfn_stub.add_response("validate_template", {"Parameters": declared_parameters()})
    cfn_stub.add_response("create_stack", {"StackId": STACK_ID})
    cfn_stub.add_response("describe_stacks", stack_description("ROLLBACK_COMPLETE", {}, {}))
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [failed]})
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [failed]})

    code = deploy.main([*NEW_STACK_ARGS, "--build-dir", str(build_dir)], clients=clients)

    assert code == 1
    assert "ROLLBACK_COMPLETE; first failure: SparkApplication: image not found" in (
        capsys.readouterr().err
    )


def test_start_popularity_starts_a_streaming_job_with_the_stack_outputs(aws: Any) -> None:
    clients, cfn_stub, emr_stub = aws
    cfn_stub.add_response("describe_stacks", stack_description("UPDATE_COMPLETE", {}, OUTPUTS))
    emr_stub.add_response(
        "list_job_runs", {"jobRuns": []}, {"applicationId": "00abc", "states": ANY}
    )
    emr_stub.add_response(
        "start_job_run",
        {"applicationId": "00abc", "jobRunId": "run-1", "arn": JOB_ARN},
        {
            "applicationId": "00abc",
            "clientToken": ANY,
            "name": "encore-popularity",
            "executionRoleArn": OUTPUTS["SparkJobRoleArn"],
            "mode": "STREAMING",
            "retryPolicy": {"maxFailedAttemptsPerHour": 5},
            "jobDriver": {
                "sparkSubmit": {
                    "entryPoint": OUTPUTS["PopularityEntryPoint"],
                    "entryPointArguments": [
                        "--bucket",
                        "my-encore",
                        "--scheme",
                        "s3",
                        "--continuous",
                    ],
                    "sparkSubmitParameters": OUTPUTS["SparkSubmitParameters"]
                    + " "
                    + deploy.POPULARITY_SPARK_OPTIONS,
                }
            },
        },
    )

    assert deploy.main(["--stack", STACK, "--start-popularity"], clients=clients) == 0


def test_start_popularity_refuses_a_second_streaming_job(
    aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    clients, cfn_stub, emr_stub = aws
    cfn_stub.add_response("describe_stacks", stack_description("UPDATE_COMPLETE", {}, OUTPUTS))
    emr_stub.add_response("list_job_runs", {"jobRuns": [RUNNING_JOB]})

    assert deploy.main(["--stack", STACK, "--start-popularity"], clients=clients) == 2
    assert "cancel-job-run --application-id 00abc --job-run-id run-0" in capsys.readouterr().err


def test_delete_stops_spark_deletes_the_stack_and_purges_the_bucket(aws: Any) -> None:
    clients, cfn_stub, emr_stub = aws
    s3 = clients.s3
    s3.create_bucket(Bucket="my-encore")
    s3.put_bucket_versioning(Bucket="my-encore", VersioningConfiguration={"Status": "Enabled"})
    for body in (b"one", b"two"):
        s3.put_object(Bucket="my-encore", Key="landing/a.csv", Body=body)
    s3.delete_object(Bucket="my-encore", Key="landing/a.csv")  # a delete marker
    cfn_stub.add_response("describe_stacks", stack_description("UPDATE_COMPLETE", {}, OUTPUTS))
    emr_stub.add_response("list_job_runs", {"jobRuns": [RUNNING_JOB]})
    emr_stub.add_response(
        "cancel_job_run",
        {"applicationId": "00abc", "jobRunId": "run-0"},
        {"applicationId": "00abc", "jobRunId": "run-0"},
    )
    emr_stub.add_response("list_job_runs", {"jobRuns": []})
    emr_stub.add_response("stop_application", {}, {"applicationId": "00abc"})
    emr_stub.add_response(
        "get_application",
        {
            "application": {
                "applicationId": "00abc",
                "arn": APP_ARN,
                "releaseLabel": "emr-7.9.0",
                "type": "Spark",
                "state": "STOPPED",
                "createdAt": datetime(2024, 1, 1, tzinfo=UTC),
                "updatedAt": datetime(2024, 1, 1, tzinfo=UTC),
            }
        },
    )
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [EVENT]})
    cfn_stub.add_response("delete_stack", {}, {"StackName": STACK_ID})
    cfn_stub.add_response("describe_stacks", stack_description("DELETE_COMPLETE", {}, {}))
    cfn_stub.add_response("describe_stack_events", {"StackEvents": [EVENT]})

    code = deploy.main(
        ["--stack", STACK, "--delete", "--purge-bucket", "--poll-seconds", "0"], clients=clients
    )

    assert code == 0
    assert "my-encore" not in {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
