"""The CloudFormation template: lint-clean, least privilege, and in step with ``encore``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint_file
from cfnlint.decode import cfn_yaml

from encore import layout
from encore.resources import resources
from encore.settings import ENV, Settings
from infra import deploy, package

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "template.yaml"
#: Regions the template is linted for; every resource type it uses exists in both.
LINT_REGIONS = ["us-east-1", "eu-west-1"]
#: cfn-lint rule id -> why the template may break it. Every entry needs a reason.
IGNORED_LINT_RULES: dict[str, str] = {}

#: Actions that take no narrower resource than "*". A statement using "*" as its
#: resource may hold only these, and needs a "# wildcard: <why>" comment above it.
WILDCARD_RESOURCE_ACTIONS = frozenset(
    {
        # Lambda creates and removes a VPC function's network interfaces itself.
        "ec2:CreateNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DeleteNetworkInterface",
        "ec2:AssignPrivateIpAddresses",
        "ec2:UnassignPrivateIpAddresses",
    }
)
WILDCARD_COMMENT = re.compile(r"^\s*# wildcard: (?P<why>\S.{10,})$")

#: Every key prefix a policy may name in the pipeline's bucket.
LAYOUT_PREFIXES = {
    layout.LANDING_PREFIX,
    layout.LANDING_ERROR_PREFIX,
    layout.CAPTURE_DEAD_LETTER_PREFIX,
    layout.POPULARITY_QUARANTINE_PREFIX,
    layout.POPULARITY_CHECKPOINT_PREFIX,
    layout.POPULARITY_STATE_PREFIX,
    layout.FEEDS_PREFIX,
    layout.RECOMMENDATIONS_PREFIX,
}
#: Variables Spark itself reads, allowed in spark-submit options beside the settings.
SPARK_OWN_VARIABLES = {"PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return dict(cfn_yaml.load(str(TEMPLATE)))


def resources_of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: resource["Properties"]
        for name, resource in template["Resources"].items()
        if resource["Type"] == kind
    }


def statements(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every policy statement in the template, both branches of an ``Fn::If`` included."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"PolicyDocument", "AssumeRolePolicyDocument"}:
                    for statement in value["Statement"]:
                        yield from expand(statement, where)
                else:
                    yield from walk(value, where)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)

    def expand(statement: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if "Fn::If" in statement:
            for branch in statement["Fn::If"][1:]:
                if branch != {"Ref": "AWS::NoValue"}:
                    yield from expand(branch, where)
        else:
            yield f"{where}/{statement.get('Sid', statement.get('Effect'))}", statement

    for name, resource in template["Resources"].items():
        yield from walk(resource.get("Properties", {}), name)


def line_of(node: Any) -> int:
    """The 0-based line a node of cfn-lint's decoder starts on."""
    return int(node.start_mark.line)


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------- lint


def test_template_is_cfn_lint_clean() -> None:
    matches = lint_file(TEMPLATE, config=ManualArgs(regions=LINT_REGIONS, include_checks=["I"]))

    reported = [
        f"{match.rule.id} line {match.linenumber}: {match.message}"
        for match in matches
        if match.rule.id not in IGNORED_LINT_RULES
    ]
    assert reported == []


def test_cfn_lint_reports_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "template.yaml"
    broken.write_text(TEMPLATE.read_text().replace("Runtime: python3.11", "Runtime: python2.6", 1))

    matches = lint_file(broken, config=ManualArgs(regions=LINT_REGIONS))

    assert any(m.rule.id.startswith("E") for m in matches)


def test_template_fits_a_template_body() -> None:
    assert len(TEMPLATE.read_bytes()) <= deploy.TEMPLATE_BODY_LIMIT


# ---------------------------------------------------------------- least privilege


def test_no_statement_allows_a_wildcard_action(template: dict[str, Any]) -> None:
    offending = []
    for where, statement in statements(template):
        if "NotAction" in statement or "NotResource" in statement:
            offending.append(f"{where}: NotAction/NotResource")
        for action in as_list(statement.get("Action", [])):
            # A Deny has to cover a whole service (the TLS-only bucket policy); an Allow
            # names every action it grants.
            whole_service = statement["Effect"] == "Deny" and re.fullmatch(r"[a-z0-9-]+:\*", action)
            if "*" in action and not whole_service:
                offending.append(f"{where}: {action}")
    assert offending == []


def test_no_role_attaches_managed_policies(template: dict[str, Any]) -> None:
    roles = resources_of_type(template, "AWS::IAM::Role")

    assert [name for name, role in roles.items() if "ManagedPolicyArns" in role] == []


def test_wildcard_resources_are_allowlisted_and_explained(template: dict[str, Any]) -> None:
    lines = TEMPLATE.read_text().splitlines()
    explained_lines = {number for number, line in enumerate(lines) if WILDCARD_COMMENT.match(line)}

    wildcard_statements = []
    for where, statement in statements(template):
        if "*" not in as_list(statement.get("Resource", [])):
            continue
        first_line = line_of(statement)
        wildcard_statements.append(first_line)
        actions = set(as_list(statement["Action"]))
        assert statement["Effect"] == "Allow", where
        assert actions <= WILDCARD_RESOURCE_ACTIONS, (
            f"{where}: {actions - WILDCARD_RESOURCE_ACTIONS}"
        )
        above = lines[first_line - 1]
        assert WILDCARD_COMMENT.match(above), f"{where}: no '# wildcard: <why>' above it"

    # No stale comment: each explains a statement that still uses "*".
    assert {line - 1 for line in wildcard_statements} == explained_lines


def test_bucket_keys_in_policies_are_layout_prefixes(template: dict[str, Any]) -> None:
    patterns = []
    for _, statement in statements(template):
        for resource in as_list(statement.get("Resource", [])):
            text = resource.get("Fn::Sub", "") if isinstance(resource, dict) else ""
            match = re.fullmatch(r"\$\{PipelineBucket\.Arn\}/(.*)", text)
            if match:
                patterns.append(match.group(1))

    keyed = [pattern for pattern in patterns if pattern != "*"]  # the TLS-only bucket policy
    assert keyed, "no policy names a key in the bucket"
    assert [p for p in keyed if not (p.endswith("*") and p[:-1] in LAYOUT_PREFIXES)] == []


# ---------------------------------------------------------------- agreement with encore


def test_names_and_stream_settings_default_to_encore_resources(template: dict[str, Any]) -> None:
    spec = resources(Settings.load({}))
    settings = Settings.load({})
    defaults = {name: str(p.get("Default")) for name, p in template["Parameters"].items()}

    assert defaults["BucketName"] == spec.bucket
    assert defaults["StreamName"] == spec.stream.name == spec.delivery.source_stream
    assert defaults["DeliveryStreamName"] == spec.delivery.name
    assert defaults["StreamMode"] == spec.stream.mode
    assert defaults["ShardCount"] == str(spec.stream.shard_count)
    assert defaults["StreamRetentionHours"] == str(spec.stream.retention_hours)
    assert defaults["BufferIntervalSeconds"] == str(spec.delivery.buffer_interval_s)
    assert defaults["BufferSizeMiB"] == str(spec.delivery.buffer_size_mib)
    assert defaults["SlotName"] == settings.slot_name
    assert defaults["PublicationName"] == settings.publication_name


def test_resources_take_their_names_and_modes_from_the_parameters(
    template: dict[str, Any],
) -> None:
    bucket = template["Resources"]["PipelineBucket"]["Properties"]
    stream = template["Resources"]["ChangeStream"]["Properties"]
    delivery = template["Resources"]["LandingDeliveryStream"]["Properties"]

    assert bucket["BucketName"] == {"Ref": "BucketName"}
    assert stream["Name"] == {"Ref": "StreamName"}
    assert stream["StreamModeDetails"]["StreamMode"] == {"Ref": "StreamMode"}
    assert stream["ShardCount"]["Fn::If"][0] == "IsProvisioned"
    assert delivery["DeliveryStreamName"] == {"Ref": "DeliveryStreamName"}
    assert delivery["KinesisStreamSourceConfiguration"]["KinesisStreamARN"] == {
        "Fn::GetAtt": ["ChangeStream", "Arn"]
    }


def test_firehose_lands_where_encore_resources_says(template: dict[str, Any]) -> None:
    spec = resources(Settings.load({})).delivery
    delivery = template["Resources"]["LandingDeliveryStream"]["Properties"]
    destination = delivery["ExtendedS3DestinationConfiguration"]

    assert delivery["DeliveryStreamType"] == "KinesisStreamAsSource"
    assert destination["Prefix"] == spec.prefix
    assert destination["ErrorOutputPrefix"] == spec.error_prefix
    assert destination["BufferingHints"] == {
        "IntervalInSeconds": {"Ref": "BufferIntervalSeconds"},
        "SizeInMBs": {"Ref": "BufferSizeMiB"},
    }
    assert destination["CompressionFormat"] == "UNCOMPRESSED"


def test_lifecycle_rules_cover_landing_and_recommendation_runs(template: dict[str, Any]) -> None:
    rules = template["Resources"]["PipelineBucket"]["Properties"]["LifecycleConfiguration"]
    prefixes = {rule.get("Prefix") for rule in rules["Rules"]}
    runs = layout.RECOMMENDATIONS_PREFIX + "runs/"

    assert {layout.LANDING_PREFIX, layout.LANDING_ERROR_PREFIX, runs} <= prefixes
    assert layout.run_prefix("20240101T000000Z").startswith(runs)
    assert not layout.RECOMMENDATIONS_POINTER.startswith(runs)
    assert any("NoncurrentVersionExpiration" in rule for rule in rules["Rules"])


def test_lambda_environment_names_are_settings(template: dict[str, Any]) -> None:
    functions = resources_of_type(template, "AWS::Lambda::Function")
    names = {
        name: set(function["Environment"]["Variables"]) for name, function in functions.items()
    }

    assert {name: variables - set(ENV.values()) for name, variables in names.items()} == {
        name: set() for name in functions
    }
    assert {
        ENV["bucket"],
        ENV["stream_name"],
        ENV["database_secret_id"],
        ENV["slot_name"],
        ENV["publication_name"],
    } <= names["CaptureFunction"]
    assert {ENV["bucket"], ENV["presign_secret"]} <= names["PresignFunction"]


def test_spark_environment_names_are_settings(template: dict[str, Any]) -> None:
    machine = template["Resources"]["NightlyStateMachine"]["Properties"]
    options = machine["DefinitionSubstitutions"]["SparkSubmitParameters"]["Fn::Sub"]
    variables = set(re.findall(r"(?:driverEnv|executorEnv)\.([A-Z_]+)=", options))

    assert variables
    assert variables - set(ENV.values()) - SPARK_OWN_VARIABLES == set()


def test_both_spark_jobs_run_with_the_same_options(template: dict[str, Any]) -> None:
    machine = template["Resources"]["NightlyStateMachine"]["Properties"]

    assert (
        machine["DefinitionSubstitutions"]["SparkSubmitParameters"]
        == template["Outputs"]["SparkSubmitParameters"]["Value"]
    )


def test_capture_timeout_leaves_room_for_the_time_margin(template: dict[str, Any]) -> None:
    capture = template["Resources"]["CaptureFunction"]["Properties"]

    assert capture["Timeout"] > Settings.load({}).capture_time_margin_s
    assert capture["ReservedConcurrentExecutions"] == 1


@pytest.mark.parametrize(
    ("function", "code_key", "bundle"),
    [
        ("CaptureFunction", "CaptureCodeKey", "capture"),
        ("PresignFunction", "PresignCodeKey", "presign"),
    ],
)
def test_handlers_are_inside_their_bundles(
    template: dict[str, Any], function: str, code_key: str, bundle: str
) -> None:
    properties = template["Resources"][function]["Properties"]
    module_path = properties["Handler"].rsplit(".", 1)[0].replace(".", "/") + ".py"
    sources = next(b.sources for b in package.LAMBDA_BUNDLES if b.name == bundle)

    assert properties["Code"]["S3Key"] == {"Ref": code_key}
    assert any(module_path == s or module_path.startswith(s + "/") for s in sources)


def test_every_alarm_notifies_the_alarm_topic(template: dict[str, Any]) -> None:
    alarms = resources_of_type(template, "AWS::CloudWatch::Alarm")
    metrics = {alarm.get("MetricName") for alarm in alarms.values()}

    assert {
        "SlotLagBytes",
        "GetRecords.IteratorAgeMilliseconds",
        "DeliveryToS3.DataFreshness",
        "DeliveryToS3.Success",
        "Errors",
    } <= metrics
    assert [
        name for name, a in alarms.items() if a["AlarmActions"] != [{"Ref": "AlarmTopic"}]
    ] == []


# ---------------------------------------------------------------- the deploy guide

DEPLOY_GUIDE = TEMPLATE.parents[1] / "docs" / "deploy.md"
TABLE_START, TABLE_END = "<!-- parameters-table:start -->", "<!-- parameters-table:end -->"


def parameters_table(template: dict[str, Any]) -> str:
    """The template's parameters as the markdown table docs/deploy.md embeds."""
    options = {
        parameter: f"`--{option.replace('_', '-')}`"
        for option, parameter in deploy.OPTION_PARAMETERS.items()
    }
    options["PresignSecret"] = "`ENCORE_PRESIGN_SECRET`"
    for code in ("CaptureCodeKey", "PresignCodeKey", "SparkCodePrefix"):
        options[code] = "set by the deploy"
    rows = ["| parameter | given with | default | meaning |", "| --- | --- | --- | --- |"]
    for name, parameter in template["Parameters"].items():
        if "Default" not in parameter:
            default = "required"
        elif parameter["Default"] == "":
            default = "empty"
        else:
            default = f"`{parameter['Default']}`"
        given = options.get(name, f"`--parameter {name}=...`")
        rows.append(f"| `{name}` | {given} | {default} | {parameter['Description']} |")
    return "\n".join(rows)


def test_deploy_guide_lists_every_parameter(template: dict[str, Any]) -> None:
    guide = DEPLOY_GUIDE.read_text()
    embedded = guide.split(TABLE_START)[1].split(TABLE_END)[0].strip()

    # On a mismatch, paste the expected table between the markers.
    assert embedded == parameters_table(template)
