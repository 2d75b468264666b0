"""The README and .env.pkcs11.example document every option of the one table."""

from pathlib import Path

from lap_pkcs11.per_signature.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent


def test_readme_lists_every_option_and_variable():
    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        if option.flag:
            assert f"`{option.flag} " in readme, option.flag
        for name in option.envs:
            assert f"`{name}`" in readme, name


def test_env_example_documents_every_variable():
    example = (ROOT / ".env.pkcs11.example").read_text()
    for option in OPTIONS:
        for name in option.envs:
            assert f"{name}=" in example, name
