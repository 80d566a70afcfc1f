from pathlib import Path

import pytest

from appliance.common.config import ConfigError
from appliance.common.config_file import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_defaults_bind_loopback_on_8100(tmp_path):
    settings = load_settings(environ={})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8100
    assert settings.server.max_header_kb == 32  # agents send large headers
    assert settings.server.workers >= 1
    assert settings.data_dir == Path("appliance-data").resolve()
    assert settings.discovery.enabled
    assert settings.backends == []


def test_file_values_and_env_interpolation(tmp_path):
    path = write(tmp_path, """
[server]
port = 9000
[[backends]]
name = "vllm"
url = "http://127.0.0.1:8000/v1/"
api_key = "${VLLM_KEY}"
timeout_s = 30
[[backends]]
name = "ollama"
type = "ollama"
url = "http://${OLLAMA_HOST:-127.0.0.1}:11434"
[[models]]
name = "chat"
target = "vllm/Qwen/Qwen2.5-7B-Instruct"
""")
    settings = load_settings(path, environ={"VLLM_KEY": "sk-upstream"})
    assert settings.server.port == 9000
    vllm, ollama = settings.backends
    assert vllm.url == "http://127.0.0.1:8000/v1"
    assert vllm.api_key.get_secret_value() == "sk-upstream"
    assert vllm.timeout_s == 30 and vllm.connect_timeout_s == 3
    assert ollama.url == "http://127.0.0.1:11434"
    assert settings.models[0].target == "vllm/Qwen/Qwen2.5-7B-Instruct"
    assert settings.config_file == path.resolve()


def test_secrets_are_masked_when_printed(tmp_path):
    path = write(tmp_path, '[[backends]]\nname = "x"\nurl = "http://h/v1"\napi_key = "sk-very-secret"\n')
    dumped = load_settings(path, environ={}).masked()
    assert "sk-very-secret" not in repr(dumped)
    assert dumped["backends"][0]["api_key"] == "**********"


def test_missing_env_var_names_file_and_key(tmp_path):
    path = write(tmp_path, '[[backends]]\nname = "x"\nurl = "http://h/v1"\napi_key = "${NOPE}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)
    assert "backends[0].api_key" in str(info.value)
    assert "NOPE" in str(info.value)


@pytest.mark.parametrize(("text", "where", "what"), [
    ("[server]\nprot = 1\n", "server.prot", "unknown key"),
    ("[server]\nport = 70000\n", "server.port", "less than or equal to 65535"),
    ('[[backends]]\nname = "a/b"\nurl = "http://h"\n', "backends[0].name", "no '/'"),
    ('[[backends]]\nname = "a"\nurl = "ftp://h"\n', "backends[0].url", "http"),
    ('[[backends]]\nname = "a"\nurl = "http://h"\ntype = "grpc"\n', "backends[0].type", "'openai' or 'ollama'"),
    ('[[backends]]\nname = "a"\nurl = "http://h"\n[[backends]]\nname = "a"\nurl = "http://g"\n',
     "backends[1].name", "duplicate"),
    ('[server]\ntls_cert = "c.pem"\n', "server", "together"),
    ("[server]\nmax_header_kb = 0\n", "server.max_header_kb", "greater than or equal to 1"),
    ("[server]\nmax_header_kb = 4096\n", "server.max_header_kb", "less than or equal to 1024"),
])
def test_invalid_values_name_the_key(tmp_path, text, where, what):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    message = str(info.value)
    assert message.startswith(str(path))
    assert where in message and what in message


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\n"), environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_relative_data_dir_resolves_against_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    path = write(folder, '[server]\ndata_dir = "state"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings(path, environ={}).data_dir == folder / "state"


def test_precedence_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, '[server]\nport = 9000\nworkers = 3\ndata_dir = "from-file"\n')
    environ = {"APPLIANCE_CONFIG": str(path), "APPLIANCE_DATA_DIR": str(tmp_path / "from-env")}
    settings = load_settings(environ=environ, overrides={"server": {"port": 9100, "workers": None}})
    assert settings.server.port == 9100  # flag beats file
    assert settings.server.workers == 3  # unset flag leaves the file's value
    assert settings.data_dir == tmp_path / "from-env"  # env beats file
    flagged = load_settings(environ=environ, overrides={"server": {"data_dir": str(tmp_path / "flag")}})
    assert flagged.data_dir == tmp_path / "flag"


def test_settings_pickle_for_workers(tmp_path):
    import pickle

    path = write(tmp_path, '[[backends]]\nname = "x"\nurl = "http://h/v1"\napi_key = "k"\n')
    settings = load_settings(path, environ={})
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_auth_off_only_on_loopback(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, '[auth]\nmode = "none"\n'), environ={}).auth.mode == "none"
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\n[auth]\nmode = "none"\n')
    with pytest.raises(ConfigError, match="loopback"):
        load_settings(path, environ={})
