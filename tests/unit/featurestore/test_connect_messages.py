"""The one-line messages of a Cassandra that refuses: credentials, grants, a missing schema."""

from __future__ import annotations

from cassandra import AuthenticationFailed, InvalidRequest, Unauthorized
from cassandra.cluster import NoHostAvailable
from pydantic import SecretStr

from streamscore.featurestore.cassandra import connect_problem, schema_problem
from streamscore.featurestore.online import SchemaMissing
from streamscore.settings import CassandraSettings

SECRET = "pa55-not-shown"


def _refused(message: str) -> NoHostAvailable:
    return NoHostAvailable("Unable to connect to any servers", {"127.0.0.1:9042": AuthenticationFailed(message)})


def test_a_wrong_password_names_the_user_and_the_settings_not_is_it_running() -> None:
    settings = CassandraSettings(username="app", password=SecretStr(SECRET))
    line = connect_problem(settings, _refused("Provided username app and/or password are incorrect"))
    assert line.startswith("Cassandra at 127.0.0.1:9042 refused the credentials of user 'app'")
    assert "STREAMSCORE_CASSANDRA__PASSWORD" in line and "is it running" not in line
    assert SECRET not in line and "\n" not in line


def test_no_user_on_an_authenticating_server_says_to_set_one() -> None:
    line = connect_problem(CassandraSettings(), _refused("Remote end requires authentication"))
    assert "wants credentials" in line and "STREAMSCORE_CASSANDRA__USERNAME" in line


def test_nobody_answering_asks_whether_it_runs() -> None:
    line = connect_problem(CassandraSettings(port=1), NoHostAvailable("no", {"127.0.0.1:1": ConnectionRefusedError()}))
    assert line.startswith("cannot reach Cassandra at 127.0.0.1:1") and "STREAMSCORE_CASSANDRA__HOSTS" in line


def test_a_missing_table_points_at_features_init_and_a_missing_grant_at_the_grant() -> None:
    settings = CassandraSettings(keyspace="ks", username="app")
    missing = schema_problem(settings, "view_card", "card", InvalidRequest("unconfigured table view_card"))
    assert isinstance(missing, SchemaMissing) and "streamscore features init" in str(missing)
    denied = schema_problem(settings, "view_card", "card", Unauthorized("User app has no SELECT permission"))
    assert "GRANT SELECT, MODIFY ON KEYSPACE ks TO <role>" in str(denied) and "'app'" in str(denied)
