"""DRF pieces shared by the business apps' APIs: permissions, the 409 error,
documented error shapes, and the token endpoint.

Error bodies are DRF's own: `{"detail": "..."}` for 401/403/404/409 and for
unparsable JSON, and field errors (`{"field": ["message"]}`, nested for list
items as `{"lines": {"0": {"sku": [...]}}}`) for 400.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import permissions, serializers, status
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView


class Conflict(APIException):
    """The request is well-formed but the resource's state forbids it, e.g.
    shipping a rejected order. The client should re-read the resource."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "The resource's current state does not allow this."
    default_code = "conflict"


class IsStaff(permissions.BasePermission):
    message = "Staff only."

    def has_permission(self, request: Request, view: APIView) -> bool:
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


class IsStaffOrReadOnly(permissions.BasePermission):
    """Any signed-in user reads; only staff write."""

    message = "Staff only."

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return request.method in permissions.SAFE_METHODS or bool(user.is_staff)


class DetailSerializer(serializers.Serializer):
    detail = serializers.CharField()


_DESCRIPTIONS = {
    400: "Invalid input: field errors keyed by field name, or `detail` for unparsable JSON.",
    401: "Not authenticated (no or invalid token/session).",
    403: "Authenticated but not allowed (e.g. a customer on a staff endpoint).",
    404: "Not found (for a list: a page past its end), or not yours: another "
    "customer's resource is indistinguishable from a missing one.",
    409: "The resource's state does not allow this command.",
}


def error_responses(*codes: int) -> dict[int, OpenApiResponse]:
    """Schema entries for the error statuses an endpoint can answer."""
    return {
        code: OpenApiResponse(
            response=OpenApiTypes.OBJECT if code == 400 else DetailSerializer,
            description=_DESCRIPTIONS[code],
        )
        for code in codes
    }


def location_header(code: int = 201) -> OpenApiParameter:
    return OpenApiParameter(
        "Location",
        # A relative reference ("/api/orders/<id>/"), which RFC 9110 allows.
        {"type": "string", "format": "uri-reference"},
        OpenApiParameter.HEADER,
        response=[code],
        description="URL of the created resource",
    )


class TokenSerializer(serializers.Serializer):
    token = serializers.CharField()


class TokenObtainView(ObtainAuthToken):
    """DRF's token endpoint, documented. Bad credentials are a 400 with
    `non_field_errors` (DRF's behaviour); a missing field is a 400 on it."""

    @extend_schema(
        request=AuthTokenSerializer,
        responses={200: TokenSerializer, **error_responses(400)},
        auth=[],
        summary="Exchange username and password for an API token",
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().post(request, *args, **kwargs)
