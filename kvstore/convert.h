// Proto <-> core conversions for the kvq.v1 contract; enums are mapped explicitly, never cast.
#pragma once

#include "absl/status/statusor.h"
#include "kvstore.pb.h"
#include "kvstore/store.h"

namespace kvq::store {

absl::StatusOr<kvq::DType> FromProto(v1::DType d);
v1::DType ToProto(kvq::DType d);
absl::StatusOr<kvq::Preset> FromProto(v1::Preset p);
v1::Preset ToProto(kvq::Preset p);
absl::StatusOr<kvq::QuantConfig> FromProto(const v1::QuantConfig& c);
v1::QuantConfig ToProto(const kvq::QuantConfig& c);
// Builds and validates a session spec from a CreateSession request.
absl::StatusOr<SessionSpec> SpecFromProto(const v1::CreateSessionRequest& req);
void ToProto(const SessionSnapshot& s, v1::SessionInfo* out);

}  // namespace kvq::store
