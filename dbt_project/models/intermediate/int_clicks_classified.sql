-- Every request for a tracked link, with `is_prefetch`: a link preview or scanner fetched it,
-- not a person: a HEAD request (a browser asks with GET), or a user agent of
-- var('link_preview_agents') (macros/clicks.sql). A GET without a user agent is a person.

with

clicks as (

    select * from {{ ref('stg_ops__clicks') }}

),

final as (

    select
        *,
        method = 'HEAD' or {{ is_link_preview_agent('user_agent') }} as is_prefetch
    from clicks

)

select * from final
