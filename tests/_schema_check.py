"""A small JSON Schema (draft-07) validator for the test suite.

Used when the ``jsonschema`` package is not importable (the project itself is
stdlib-only, so the tests must not depend on it). It implements the draft-07
validation keywords; annotation keywords are accepted and ignored. Any keyword
it does not know raises ``SchemaError``, so a schema using something this
validator cannot check makes the test fail instead of silently passing.
"""

import math
import re

__all__ = ["SchemaError", "ValidationError", "validate", "errors", "best_validator"]


class SchemaError(Exception):
    """The schema uses something this validator does not understand."""


class ValidationError(Exception):
    """The instance does not validate against the schema."""


# Keywords that carry no validation meaning in draft-07 (format is an
# annotation unless a format checker is asked for, as in jsonschema).
_ANNOTATIONS = frozenset(
    [
        "$schema",
        "$id",
        "id",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "format",
        "definitions",
        "$defs",
        "readOnly",
        "writeOnly",
        "contentMediaType",
        "contentEncoding",
    ]
)

_VALIDATING = frozenset(
    [
        "$ref",
        "type",
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "dependencies",
        "items",
        "additionalItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "contains",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "if",
        "then",
        "else",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
    ]
)

_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")


def _is_type(value, name):
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "integer":
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return True
        return isinstance(value, float) and math.isfinite(value) and value.is_integer()
    raise SchemaError("unknown type %r" % (name,))


def _json_equal(a, b):
    """Equality as JSON sees it: 1 == 1.0, but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _resolve(root, ref):
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise SchemaError("only local $ref ('#/...') is supported, got %r" % (ref,))
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise SchemaError("unresolvable $ref %r" % (ref,))
    return node


class _Validator:
    def __init__(self, root):
        self.root = root

    def errors(self, inst, schema, path="$"):
        """Yield error strings for ``inst`` against ``schema``."""
        if schema is True:
            return
        if schema is False:
            yield "%s: schema false rejects everything" % path
            return
        if not isinstance(schema, dict):
            raise SchemaError(
                "%s: a schema must be an object or a boolean, got %r" % (path, schema)
            )
        for key in schema:
            if key not in _ANNOTATIONS and key not in _VALIDATING:
                raise SchemaError("%s: unsupported schema keyword %r" % (path, key))

        if "$ref" in schema:
            # draft-07: siblings of $ref are ignored
            for e in self.errors(inst, _resolve(self.root, schema["$ref"]), path):
                yield e
            return

        if "type" in schema:
            types = schema["type"]
            if isinstance(types, str):
                types = [types]
            if not isinstance(types, list) or not types:
                raise SchemaError("%s: bad 'type' %r" % (path, schema["type"]))
            for t in types:
                if t not in _TYPES:
                    raise SchemaError("%s: unknown type %r" % (path, t))
            if not any(_is_type(inst, t) for t in types):
                yield "%s: %r is not of type %s" % (path, inst, "/".join(types))
                return

        if "enum" in schema:
            if not any(_json_equal(inst, v) for v in schema["enum"]):
                yield "%s: %r is not one of %r" % (path, inst, schema["enum"])
        if "const" in schema:
            if not _json_equal(inst, schema["const"]):
                yield "%s: %r is not %r" % (path, inst, schema["const"])

        for key in ("allOf", "anyOf", "oneOf"):
            if key not in schema:
                continue
            subs = schema[key]
            if not isinstance(subs, list) or not subs:
                raise SchemaError("%s: %s must be a non-empty list" % (path, key))
            results = [list(self.errors(inst, s, path)) for s in subs]
            passing = sum(1 for r in results if not r)
            if key == "allOf":
                for r in results:
                    for e in r:
                        yield e
            elif key == "anyOf" and passing == 0:
                yield "%s: matches none of anyOf (%s)" % (path, "; ".join(r[0] for r in results))
            elif key == "oneOf" and passing != 1:
                yield "%s: matches %d of oneOf, must match exactly one (%s)" % (
                    path,
                    passing,
                    "; ".join(r[0] for r in results if r),
                )

        if "not" in schema:
            if not list(self.errors(inst, schema["not"], path)):
                yield "%s: %r must not match %r" % (path, inst, schema["not"])

        if "if" in schema:
            if not list(self.errors(inst, schema["if"], path)):
                if "then" in schema:
                    for e in self.errors(inst, schema["then"], path):
                        yield e
            elif "else" in schema:
                for e in self.errors(inst, schema["else"], path):
                    yield e

        if _is_type(inst, "number"):
            if "minimum" in schema and inst < schema["minimum"]:
                yield "%s: %r < minimum %r" % (path, inst, schema["minimum"])
            if "maximum" in schema and inst > schema["maximum"]:
                yield "%s: %r > maximum %r" % (path, inst, schema["maximum"])
            if "exclusiveMinimum" in schema and inst <= schema["exclusiveMinimum"]:
                yield "%s: %r <= exclusiveMinimum %r" % (path, inst, schema["exclusiveMinimum"])
            if "exclusiveMaximum" in schema and inst >= schema["exclusiveMaximum"]:
                yield "%s: %r >= exclusiveMaximum %r" % (path, inst, schema["exclusiveMaximum"])
            if "multipleOf" in schema:
                q = inst / schema["multipleOf"]
                if not (math.isfinite(q) and q == int(q)):
                    yield "%s: %r is not a multiple of %r" % (path, inst, schema["multipleOf"])

        if isinstance(inst, str):
            if "minLength" in schema and len(inst) < schema["minLength"]:
                yield "%s: %r is shorter than %r" % (path, inst, schema["minLength"])
            if "maxLength" in schema and len(inst) > schema["maxLength"]:
                yield "%s: string is longer than %r" % (path, schema["maxLength"])
            if "pattern" in schema and not re.search(schema["pattern"], inst):
                yield "%s: %r does not match %r" % (path, inst, schema["pattern"])

        if isinstance(inst, list):
            if "minItems" in schema and len(inst) < schema["minItems"]:
                yield "%s: fewer than %r items" % (path, schema["minItems"])
            if "maxItems" in schema and len(inst) > schema["maxItems"]:
                yield "%s: more than %r items" % (path, schema["maxItems"])
            if schema.get("uniqueItems"):
                for i in range(len(inst)):
                    for j in range(i + 1, len(inst)):
                        if _json_equal(inst[i], inst[j]):
                            yield "%s: items %d and %d are equal" % (path, i, j)
            items = schema.get("items", True)
            if isinstance(items, list):
                for i, (v, s) in enumerate(zip(inst, items)):
                    for e in self.errors(v, s, "%s[%d]" % (path, i)):
                        yield e
                extra = schema.get("additionalItems", True)
                for i in range(len(items), len(inst)):
                    for e in self.errors(inst[i], extra, "%s[%d]" % (path, i)):
                        yield e
            else:
                for i, v in enumerate(inst):
                    for e in self.errors(v, items, "%s[%d]" % (path, i)):
                        yield e
            if "contains" in schema:
                if not any(not list(self.errors(v, schema["contains"], path)) for v in inst):
                    yield "%s: no item matches 'contains'" % path

        if isinstance(inst, dict):
            for name in schema.get("required", []):
                if name not in inst:
                    yield "%s: required property %r is missing" % (path, name)
            if "minProperties" in schema and len(inst) < schema["minProperties"]:
                yield "%s: fewer than %r properties" % (path, schema["minProperties"])
            if "maxProperties" in schema and len(inst) > schema["maxProperties"]:
                yield "%s: more than %r properties" % (path, schema["maxProperties"])
            props = schema.get("properties", {})
            pprops = schema.get("patternProperties", {})
            addl = schema.get("additionalProperties", True)
            for name, value in inst.items():
                sub = "%s.%s" % (path, name)
                matched = False
                if name in props:
                    matched = True
                    for e in self.errors(value, props[name], sub):
                        yield e
                for pat, s in pprops.items():
                    if re.search(pat, name):
                        matched = True
                        for e in self.errors(value, s, sub):
                            yield e
                if not matched:
                    if addl is False:
                        yield "%s: additional property %r is not allowed" % (path, name)
                    else:
                        for e in self.errors(value, addl, sub):
                            yield e
            if "propertyNames" in schema:
                for name in inst:
                    for e in self.errors(name, schema["propertyNames"], "%s{%s}" % (path, name)):
                        yield e
            for name, dep in schema.get("dependencies", {}).items():
                if name not in inst:
                    continue
                if isinstance(dep, list):
                    for other in dep:
                        if other not in inst:
                            yield "%s: %r requires %r" % (path, name, other)
                else:
                    for e in self.errors(inst, dep, path):
                        yield e


def errors(instance, schema):
    """All validation errors (strings) of ``instance`` against ``schema``."""
    return list(_Validator(schema).errors(instance, schema))


def validate(instance, schema):
    """Raise ValidationError when ``instance`` does not validate."""
    errs = errors(instance, schema)
    if errs:
        raise ValidationError("; ".join(errs[:10]))


def best_validator():
    """(name, fn) where fn(instance, schema) returns a list of error strings.

    ``jsonschema``'s Draft7Validator when importable, else this module.
    """
    try:
        import jsonschema  # noqa: F401
        from jsonschema import Draft7Validator
    except ImportError:
        return "_schema_check", errors

    def js_errors(instance, schema):
        Draft7Validator.check_schema(schema)
        return [
            "%s: %s" % ("/".join(str(p) for p in e.absolute_path) or "$", e.message)
            for e in Draft7Validator(schema).iter_errors(instance)
        ]

    return "jsonschema", js_errors


def check_schema(schema, path="#"):
    """Walk every subschema (including unreachable definitions) and raise
    SchemaError on any keyword this validator does not support."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError("%s: a schema must be an object or a boolean" % path)
    for key, value in schema.items():
        if key not in _ANNOTATIONS and key not in _VALIDATING:
            raise SchemaError("%s: unsupported schema keyword %r" % (path, key))
        if key in ("properties", "patternProperties", "definitions"):
            if not isinstance(value, dict):
                raise SchemaError("%s/%s must be an object" % (path, key))
            for name, sub in value.items():
                check_schema(sub, "%s/%s/%s" % (path, key, name))
        elif key == "dependencies":
            for name, sub in value.items():
                if not isinstance(sub, list):
                    check_schema(sub, "%s/%s/%s" % (path, key, name))
        elif key in ("allOf", "anyOf", "oneOf"):
            if not isinstance(value, list):
                raise SchemaError("%s/%s must be a list" % (path, key))
            for i, sub in enumerate(value):
                check_schema(sub, "%s/%s/%d" % (path, key, i))
        elif key == "items":
            if isinstance(value, list):
                for i, sub in enumerate(value):
                    check_schema(sub, "%s/items/%d" % (path, i))
            else:
                check_schema(value, path + "/items")
        elif key in (
            "additionalProperties",
            "additionalItems",
            "propertyNames",
            "contains",
            "not",
            "if",
            "then",
            "else",
        ):
            check_schema(value, "%s/%s" % (path, key))
        elif key == "type":
            types = [value] if isinstance(value, str) else value
            if not isinstance(types, list) or any(t not in _TYPES for t in types):
                raise SchemaError("%s: bad type %r" % (path, value))
        elif key == "$ref":
            if not isinstance(value, str):
                raise SchemaError("%s: $ref must be a string" % path)
